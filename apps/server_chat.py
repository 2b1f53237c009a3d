"""One chat completion of `vlmstack serve`: a GenerationStream's pieces relayed to the
client, as one JSON reply or as OpenAI's server-sent events (a role delta, content deltas,
the finish_reason, usage with stream_options.include_usage, then `data: [DONE]`).

The stream is iterated on its own thread (it blocks), and handed to the event loop piece
by piece; a client that disconnects (checked while waiting, or the response cancelled)
cancels the stream, which frees its row in the scheduler's batch.
"""

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from apps.server_errors import ApiError

log = logging.getLogger("vlmstack.server")
DISCONNECT_POLL = 0.5  # seconds between checks that a waiting client is still there


class Reply:
    """One chat completion: the scheduler's pieces relayed to the client, whole or as
    server-sent events; a client that leaves cancels its row in the batch."""

    def __init__(self, model: str, stream, request: Request):
        self.model, self.stream, self.request = model, stream, request
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.gone = False  # the client disconnected

    async def pieces(self) -> AsyncIterator[str]:
        """The generated text pieces; iterates the blocking stream on its own thread."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def pump():
            def put(item):
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                    loop.call_soon_threadsafe(queue.put_nowait, item)

            try:
                for piece in self.stream:
                    put(("piece", piece))
                put(("end", None))
            except Exception as e:
                put(("error", e))

        threading.Thread(target=pump, daemon=True, name="chat-stream").start()
        finished = False
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    if await self.request.is_disconnected():
                        self.gone = True
                        return
                    continue
                if kind == "end":
                    finished = True
                    return
                if kind == "error":
                    finished = True
                    raise value
                yield value
        finally:
            if not finished:  # the client left, or the response was cancelled
                self.gone = True
                self.stream.cancel()
            self.request.state.usage = (self.stream.prompt_tokens, self.stream.completion_tokens)

    def usage(self) -> dict:
        prompt, completion = self.stream.prompt_tokens, self.stream.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self) -> JSONResponse:
        text = "".join([piece async for piece in self.pieces()]).strip()
        message = {"role": "assistant", "content": text}
        return JSONResponse(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": self.stream.finish_reason or "stop",
                        "logprobs": None,
                    }
                ],
                "usage": self.usage(),
            }
        )

    def _chunk(self, delta: dict, finish_reason: str | None = None, include_usage: bool = False) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        yield self._chunk({"role": "assistant", "content": ""}, include_usage=include_usage)
        try:
            async for piece in self.pieces():
                yield self._chunk({"content": piece}, include_usage=include_usage)
        except Exception as e:  # the status is sent already: report it in the stream
            log.exception("generation failed")
            yield _sse(ApiError(500, f"generation failed ({type(e).__name__})").body())
            return
        if self.gone:
            return
        yield self._chunk({}, self.stream.finish_reason or "stop", include_usage=include_usage)
        if include_usage:
            last = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
            yield _sse({**last, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
