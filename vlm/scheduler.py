"""Batched generation for concurrent callers (the server's chat requests).

    scheduler = GenerationScheduler(load_vlm("llava-easyvqa"), max_batch=16, max_wait_ms=5)
    stream = scheduler.submit([("user", "<image>\\nwhat color?")], [image], GenerationConfig(max_new_tokens=8))
    for piece in stream: ...                       # from any thread; stream.finish_reason at the end

One worker thread takes the first waiting request, waits at most `max_wait_ms` for more (up to
`max_batch`), and generates them as one left-padded batch (vlm/generation.py: each row with its
own sampling settings, so its answer is the one it gets alone). Each request's text is streamed
to its own GenerationStream as the batch decodes. Batching is static: a request that arrives
while a batch runs waits for the next batch. A cancelled stream (the client went away) or one
that hit a stop string stops being decoded at once, and the batch ends as soon as every live
row has finished, so its slot is free for the next batch then.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from vlm.generation import GenerationConfig, generate

log = logging.getLogger(__name__)
_END = object()  # the last item of a stream's queue
_CLOSE = object()  # tells the worker to stop once what is queued before it is done


class GenerationStream:
    """One request's answer as text pieces, in order; iterate it once (it blocks until each piece)."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens  # image tokens included
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # "stop" (a stop token or string) or "length"
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._pieces.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def text(self) -> str:
        """The whole answer (waits for it), stripped."""
        return "".join(self).strip()

    def cancel(self) -> None:
        """Stop generating for this request (its row ends at the next step)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Request:
    ids: list[int]  # prompt tokens, images expanded
    images: list  # decoded images, in order
    config: GenerationConfig
    stop: tuple[str, ...]  # strings that end the answer (not included in it)
    stream: GenerationStream
    tokens: list[int] = field(default_factory=list)  # generated so far
    emitted: int = 0  # characters of the decoded text already sent


class GenerationScheduler:
    def __init__(self, model, *, max_batch: int = 16, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, not {max_batch}, {max_wait_ms}")
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self._waiting: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()  # a submit and close do not interleave
        self.batches: list[int] = []  # sizes of the batches run (for tests and benchmarks)
        self._worker = threading.Thread(target=self._run, name="generation-scheduler", daemon=True)
        self._worker.start()

    def submit(
        self, turns: list[tuple[str, str]], images: list, config: GenerationConfig, *, stop: tuple[str, ...] = ()
    ) -> GenerationStream:
        """Queue a conversation (ending with a user turn; <image> markers matched in order with
        `images`, decoded PIL images) for generation; returns its stream at once.

        Raises:
            ValueError: placeholders and images differ, or the conversation does not fit the context.
            RuntimeError: the scheduler is closed.
        """
        turns, images = self.model.fit_to_context(list(turns), list(images), config.max_new_tokens)
        ids = self.model.encode(turns, generation_prompt=True)[0]
        stream = GenerationStream(prompt_tokens=len(ids))
        with self._submit_lock:
            if self._closed.is_set():
                raise RuntimeError("the scheduler is shutting down")
            self._waiting.put(_Request(ids, images, config, tuple(s for s in stop if s), stream))
        return stream

    def close(self, timeout: float | None = None) -> None:
        """Finish the running and queued requests, then stop; later submits raise RuntimeError."""
        with self._submit_lock:
            if not self._closed.is_set():
                self._closed.set()
                self._waiting.put(_CLOSE)
        self._worker.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._waiting.get()
            if first is _CLOSE:
                return
            batch, closing = [first], False
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    item = self._waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _CLOSE:
                    closing = True
                    break
                batch.append(item)
            live = [r for r in batch if not r.stream.cancelled]
            for request in batch:
                if request.stream.cancelled:
                    request.stream.finish_reason = "cancelled"
                    request.stream._pieces.put(_END)
            if live:
                self._generate(live)
            if closing:
                while not self._waiting.empty():  # submitted before close took the lock
                    item = self._waiting.get()
                    if item is not _CLOSE:
                        self._generate([item])
                return

    def _generate(self, batch: list[_Request]) -> None:
        """One batched generation; every request's stream gets its pieces, then its end (or the error)."""
        self.batches.append(len(batch))
        model = self.model
        ended = torch.zeros(len(batch), dtype=torch.bool)
        stop_ids = model.stop_ids()
        try:
            prompt = model.prepare([r.ids for r in batch], [r.images for r in batch])
            steps = generate(
                model,
                prompt,
                stop_ids=stop_ids,
                pad_id=model.tokenizer.pad_token_id,
                config=[r.config for r in batch],
                ended=ended,
            )
            for tokens in steps:
                for row, request in enumerate(batch):
                    if ended[row]:
                        continue
                    token = int(tokens[row])
                    if request.stream.cancelled:
                        ended[row] = True
                        request.stream.finish_reason = "cancelled"
                        continue
                    request.tokens.append(token)
                    request.stream.completion_tokens += 1
                    if token in stop_ids:
                        ended[row] = True
                        request.stream.finish_reason = "stop"
                    elif self._emit(request):  # a stop string
                        ended[row] = True
                        request.stream.finish_reason = "stop"
                    elif len(request.tokens) >= request.config.max_new_tokens:
                        ended[row] = True
                        request.stream.finish_reason = "length"
        except Exception as e:  # the batch failed: every caller hears why, the scheduler goes on
            log.exception("generation batch of %d failed", len(batch))
            for request in batch:
                request.stream._pieces.put(e)
            return
        for request in batch:
            if not request.stream.cancelled:
                self._emit(request, last=True)
            request.stream.finish_reason = request.stream.finish_reason or "length"
            request.stream._pieces.put(_END)

    def _emit(self, request: _Request, *, last: bool = False) -> bool:
        """Send the new text of a request's tokens; True when a stop string appeared (the text
        before it is sent, the rest dropped). Text that may begin a stop string is held back
        unless this is the `last` call; text ending in half a multi-byte character waits for
        the rest (and is dropped at the end), as ChatMixin.chat streams."""
        text = self.model.tokenizer.decode(request.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return False
        found = [i for i in (text.find(s) for s in request.stop) if i >= 0]
        cut = min(found, default=-1)
        if cut >= 0:
            final = text[:cut]
        else:
            final = text if last else text[: len(text) - _held_back(text, request.stop)]
        if len(final) > request.emitted:
            piece = final[request.emitted :]
            request.stream._pieces.put(piece if request.emitted else piece.lstrip())
            request.emitted = len(final)
        return cut >= 0


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may be the start of a stop string (not sent yet)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
