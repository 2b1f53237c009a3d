"""One CLIP and one index shared by every request of a server or app.

    service = SearchService(index="pictures.index")      # or clip="clip-easyvqa" without an index
    service.embed_texts(["a red circle"])                # (N, dim) float32, L2-normalised
    service.search_text("a red circle", k=10)            # -> [Hit(rank, score, path)]
    service.thumbnail(hit.path)                          # JPEG bytes, only for indexed files
    service.match_map(hit.path, query="a red circle")    # (picture, heat): where it matched

Requests arrive on many threads; their CLIP encodings go through a MicroBatcher, whose
one worker thread runs the requests that arrive within `max_wait_ms` of each other (up to
`max_batch` inputs) as one forward pass. A forward costs about the same for 1 or 50 short
texts on a CPU, so 50 concurrent searches take about one forward, not 50. Searching is
retrieval.Searcher's (same query syntax, same vectors), with its encoder swapped for the
batched one.
"""

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from apps.heatmap import match_saliency
from retrieval import Hit, Searcher
from retrieval.index import DEFAULT_MODEL
from vlm.clip import Clip, load_clip
from vlm.errors import VlmError
from vlm.images import ImageSource, load_image

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Request(Generic[In]):
    items: list[In]
    result: Future


class MicroBatcher(Generic[In, Out]):
    """Runs `fn` on the inputs of concurrent `submit` calls together, in one worker thread.

    The worker takes the first waiting request, then keeps adding requests that arrive
    within `max_wait_ms` while the batch holds fewer than `max_batch` inputs (a request
    is never split; one bigger than `max_batch` runs alone). `fn(items)` must return one
    output per item, independent of the other items. If a batch of several requests
    fails, each request is run again alone, so one bad input fails only its own caller.
    """

    def __init__(
        self, fn: Callable[[list[In]], Sequence[Out]], *, max_batch: int = 64, max_wait_ms: float = 2.0, name: str = ""
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=f"microbatch-{name}", daemon=True)
        self._worker.start()

    def submit(self, items: Sequence[In]) -> list[Out]:
        """`fn(items)`, computed in a batch with other callers' items; blocks until done.

        Raises:
            whatever `fn` raised for these items; RuntimeError once closed.
        """
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if not items:
            return []
        request = _Request(list(items), Future())
        self._queue.put(request)
        return request.result.result()

    def close(self) -> None:
        """Finish the requests already submitted, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join()
        while not self._queue.empty():  # submitted while closing: fail them rather than hang
            request = self._queue.get()
            if request is not None:
                request.result.set_exception(RuntimeError("the batcher is closed"))

    def _run(self) -> None:
        held: _Request | None = None  # arrived too late to fit the last batch
        while True:
            first = held or self._queue.get()
            held = None
            if first is None:
                return
            batch, size, stop = [first], len(first.items), False
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if size + len(nxt.items) > self.max_batch:
                    held = nxt
                    break
                batch.append(nxt)
                size += len(nxt.items)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Request]) -> None:
        try:
            outputs = self.fn([item for request in batch for item in request.items])
        except Exception as e:
            if len(batch) == 1:
                batch[0].result.set_exception(e)
            else:
                for request in batch:
                    self._run_batch([request])
            return
        start = 0
        for request in batch:
            request.result.set_result(list(outputs[start : start + len(request.items)]))
            start += len(request.items)


class _BatchedClip:
    """The part of vlm.clip.Clip that Searcher uses, encoding through the service's batchers."""

    def __init__(self, clip: Clip, service: "SearchService"):
        self.tokenizer, self.context_length, self.fingerprint = clip.tokenizer, clip.context_length, clip.fingerprint
        self._service = service

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(self._service.embed_texts(list(texts)))

    def encode_images(self, images: Sequence[ImageSource]) -> torch.Tensor:
        return torch.from_numpy(self._service.embed_images(list(images)))


class SearchService:
    """One CLIP + optional index shared by all requests: CLIP encodings of concurrent callers
    (threads) are batched (up to max_batch, waiting at most max_wait_ms to fill), searches
    take ~ms, thumbnails are cached."""

    def __init__(
        self,
        *,
        index: str | Path | None = None,
        clip: str | None = None,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
    ):
        """`clip` None: the index's own CLIP (its manifest names it); neither given: the
        shipped default CLIP.

        Raises:
            VlmError: a missing or corrupt index, an unknown CLIP, or a CLIP that is not
                the one the index was built with.
        """
        self._searcher: Searcher | None = None
        if index is not None:
            self._searcher = Searcher.open(index, model=clip)
            self._clip, self.clip_name = self._searcher.clip, clip or self._searcher.manifest.model
            self._searcher.clip = _BatchedClip(self._clip, self)
        else:
            self.clip_name = clip or DEFAULT_MODEL
            self._clip = load_clip(self.clip_name)
        self.dim: int = self._clip.embed_dim
        self._texts = MicroBatcher(
            lambda texts: self._clip.encode_texts(texts).numpy(),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            name="text",
        )
        self._images = MicroBatcher(
            lambda images: self._clip.encode_images(images).numpy(),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            name="image",
        )

    @property
    def root(self) -> Path:
        """The indexed folder (hit paths are inside it). Raises VlmError without an index."""
        return self._index().root

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32, L2-normalised CLIP text embeddings (the raw texts: no query syntax)."""
        return _stack(self._texts.submit(texts), self.dim)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """(N, dim) float32, L2-normalised, as the index's image vectors. Raises ImageError."""
        return _stack(self._images.submit(images), self.dim)

    def search_text(self, query: str, k: int) -> list[Hit]:
        """Hits for a text query (Searcher's syntax: "a + b - c", "2:a"). Raises VlmError
        without an index, for an empty query or k < 1."""
        return self._index().search_text(query, k=k)

    def search_image(self, image: Image.Image, k: int, *, text: str | None = None) -> list[Hit]:
        """Hits for pictures like `image` (plus the `text` query's terms, if given)."""
        return self._index().search_image(image, k=k, text=text)

    def match_map(self, path: str, *, query: str | None = None, image: Image.Image | None = None):
        """(picture, (g, g) heat in [0, 1]): where the indexed file at `path` matches the
        search for `query` and/or `image` (apps/heatmap.match_saliency).

        Raises:
            KeyError: `path` is not an indexed file inside the folder (nothing is opened).
            VlmError: no index, an empty query, or the file cannot be read as an image.
        """
        searcher = self._index()
        resolved = searcher.resolve(path)
        if resolved is None:
            raise KeyError(f"not an indexed file: {str(path)[:200]}")
        picture = load_image(resolved)
        return picture, match_saliency(self._clip, picture, searcher.query_vector(text=query, image=image))

    def thumbnail(self, path: str) -> bytes:
        """JPEG bytes of a cached thumbnail (256 px long side) of a file the index holds.

        Raises:
            KeyError: `path` is not an indexed file inside the folder (nothing is opened).
            VlmError: no index, or the file cannot be read as an image.
        """
        return self._index().thumbnail(path)

    def close(self) -> None:
        self._texts.close()
        self._images.close()
        if self._searcher is not None:
            self._searcher.close()

    def _index(self) -> Searcher:
        if self._searcher is None:
            raise VlmError("no index: start with an index to search")
        return self._searcher


def _stack(rows: list[np.ndarray], dim: int) -> np.ndarray:
    return np.stack(rows).astype(np.float32, copy=False) if rows else np.empty((0, dim), np.float32)
