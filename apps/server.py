"""`vlmstack serve`: an OpenAI-compatible HTTP API over the VQA models, CLIP and the image index.

    GET  /health                 liveness and the loaded models (no key needed)
    GET  /v1/models              the VQA models on offer and the CLIP model, each with its kind
    POST /v1/chat/completions    text + image_url parts; stream=true as server-sent events
    POST /v1/embeddings          CLIP embeddings of texts, and of {"image": URL} items (our extension)
    POST /v1/search              {"query"?, "image"?, "k"} -> {"data": [{"path", "score", "thumbnail_url"}]}
                                 (paths relative to the indexed folder)
    GET  /v1/thumbnails?path=P   a JPEG thumbnail of a file the index holds (nothing else)

Chat requests for one model go to its GenerationScheduler (vlm/scheduler.py), which batches
concurrent requests into one generation; CLIP work goes to a SearchService
(apps/search_service.py), which batches encodings the same way. VQA models load on first
use, by allowed name only (the shipped ones and --model ones); at most `MODELS_LOADED` stay
loaded, the least recently used is closed once its running requests finish.

`build_api` returns the FastAPI app (the Gradio app can mount it); `serve` runs it with
uvicorn. Request schemas and image rules: apps/server_inputs.py; errors, auth, body limit
and the access log: apps/server_errors.py.
"""

import base64
import contextlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from apps.server_chat import Reply
from apps.server_errors import ApiError, Guard, install_error_handlers
from apps.server_inputs import (
    ChatRequest,
    EmbeddingRequest,
    ImagePolicy,
    SearchRequest,
    chat_turns,
    parse_body,
    parse_embedding_inputs,
)
from apps.web_safety import check_bind, is_loopback
from vlm import hub
from vlm.errors import VlmError
from vlm.generation import GenerationConfig
from vlm.quantize import Precision, clip_precision

log = logging.getLogger("vlmstack.server")
MODELS_LOADED = 2
DEFAULT_MAX_TOKENS = 256  # when a request gives none (at most a quarter of the model's context)
SHUTDOWN_TIMEOUT = 30.0  # seconds running requests get to finish at shutdown


@dataclass
class Engine:
    model: object  # what vlm.load.load_vlm returns
    scheduler: object  # its vlm.scheduler.GenerationScheduler


class Engines:
    """A GenerationScheduler per loaded VQA model, by allowed name; at most `capacity`
    loaded (the least recently used is closed in the background, finishing its requests).
    Never loads or probes a name outside `sources`. Thread-safe."""

    def __init__(
        self, sources: dict[str, str], *, capacity: int, max_batch: int, trust_remote_code: bool, precision: Precision
    ):
        self.sources, self.capacity, self.max_batch = dict(sources), capacity, max_batch
        self.trust_remote_code, self.precision = trust_remote_code, precision
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()  # guards the two dicts
        self._loading: dict[str, threading.Lock] = {}
        self._closed = False

    def get(self, name: str) -> Engine:
        """Raises ApiError 404 for a name that is not on offer."""
        if name not in self.sources:
            raise ApiError(
                404,
                f"unknown model {name[:80]!r}; choose one of: {', '.join(self.sources)}",
                param="model",
                code="model_not_found",
            )
        with self._lock:
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # one load per name; requests for models already loaded do not wait for it
            with self._lock:
                engine = self._engines.get(name)
            if engine is None:
                engine = self._load(name)
            with self._lock:
                if self._closed:
                    engine.scheduler.close(0)
                    raise ApiError(503, "the server is shutting down")
                self._engines[name] = engine
                self._engines.move_to_end(name)
                while len(self._engines) > self.capacity:
                    _, old = self._engines.popitem(last=False)
                    threading.Thread(target=old.scheduler.close, args=(SHUTDOWN_TIMEOUT,), daemon=True).start()
            return engine

    def _load(self, name: str) -> Engine:
        from vlm.load import load_vlm
        from vlm.scheduler import GenerationScheduler

        log.info("loading %s", name)
        model = load_vlm(
            self.sources[name],
            trust_remote_code=self.trust_remote_code,
            dtype=self.precision.dtype,
            quantize=self.precision.quantize,
        )
        return Engine(model, GenerationScheduler(model, max_batch=self.max_batch))

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def close(self, timeout: float | None = SHUTDOWN_TIMEOUT) -> None:
        """Finish running and queued requests, then refuse new ones."""
        with self._lock:
            engines, self._engines, self._closed = list(self._engines.values()), OrderedDict(), True
        for engine in engines:
            engine.scheduler.close(timeout)


def vqa_sources(specs: Sequence[str]) -> dict[str, str]:
    """Model name -> what load_vlm loads: the shipped VQA models and `specs` (checked now)."""
    from apps.gradio_app import vqa_model_sources  # late: the app may mount this API

    return vqa_model_sources(list(specs))


def _kind(source: str) -> str:
    directory = hub.resolve_dir(source)
    kind = hub.model_kind(directory) if directory else None
    return "llava" if kind in (None, "lm") else kind  # an HF LLaVA checkpoint reads as "lm"


def build_api(
    *,
    models: Sequence[str] = (),
    clip_model: str | None = None,
    index: str | None = None,
    api_key: str | None = None,
    allow_remote_images: bool = False,
    max_batch: int = 16,
    loopback_only: bool = True,
    trust_remote_code: bool = False,
    precision: Precision = Precision(),
    search=None,
) -> FastAPI:
    """The API as a FastAPI app.

    Args:
        models: VQA model directories or hf:ORG/NAME to offer beside the shipped ones.
        clip_model, index: what the SearchService embeds with and searches (ignored when
            `search` is given: then that service is used, and not closed by the API).
        api_key: require `Authorization: Bearer KEY` on every /v1 route.
        allow_remote_images: fetch http(s) image URLs (else only data: URLs).
        max_batch: requests a model's scheduler generates together.
        loopback_only: refuse Host headers that are not loopback names (bound to loopback).
        precision: how the VQA models and the search CLIP compute (--dtype, --quantize).
    Raises:
        VlmError: a `models` entry that is not a VQA model.
    """
    sources = vqa_sources(models)
    kinds = {name: _kind(source) for name, source in sources.items()}
    engines = Engines(
        sources, capacity=MODELS_LOADED, max_batch=max_batch, trust_remote_code=trust_remote_code, precision=precision
    )
    owns_search = search is None
    if owns_search:
        from apps.search_service import SearchService

        with clip_precision(precision):
            search = SearchService(index=index, clip=clip_model)
    policy = ImagePolicy(allow_remote=allow_remote_images)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engines.close)  # uvicorn has already let running requests finish
        if owns_search:
            search.close()

    api = FastAPI(title="vlmstack", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.engines, api.state.search = engines, search
    install_error_handlers(api)
    api.add_middleware(Guard, api_key=api_key, loopback_only=loopback_only)

    @api.get("/health")
    async def health():
        return {"status": "ok", "models_loaded": engines.loaded()}

    @api.get("/v1/models")
    async def list_models():
        offered = [*kinds.items(), (search.clip_name, "clip")]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "vlmstack", "kind": k} for n, k in offered],
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatRequest)
        turns, urls = chat_turns(body.messages)
        engine = await run_in_threadpool(engines.get, body.model)
        images = await run_in_threadpool(policy.load, urls)
        max_tokens = body.max_completion_tokens or body.max_tokens
        try:
            config = GenerationConfig(
                max_new_tokens=max_tokens or max(1, min(DEFAULT_MAX_TOKENS, engine.model.max_length // 4)),
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed or 0,
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        stream = await run_in_threadpool(_submit, engine.scheduler, turns, images, config, body.stop_strings())
        reply = Reply(body.model, stream, request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                reply.events(include_usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await reply.whole()

    @api.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await parse_body(request, EmbeddingRequest)
        if body.model != search.clip_name:
            raise ApiError(
                404,
                f"unknown embedding model {body.model[:80]!r}; use {search.clip_name}",
                param="model",
                code="model_not_found",
            )
        if body.dimensions not in (None, search.dim):
            raise ApiError(400, f"dimensions: this model gives {search.dim}", param="dimensions")
        items = parse_embedding_inputs(body.input)
        texts = [(i, item) for i, item in enumerate(items) if isinstance(item, str)]
        pictures = [(i, item["image"]) for i, item in enumerate(items) if isinstance(item, dict)]
        vectors: list = [None] * len(items)
        if pictures:
            images = await run_in_threadpool(policy.load, [url for _, url in pictures], param="input")
            for (i, _), vector in zip(pictures, await run_in_threadpool(search.embed_images, images)):
                vectors[i] = vector
        if texts:
            for (i, _), vector in zip(texts, await run_in_threadpool(search.embed_texts, [t for _, t in texts])):
                vectors[i] = vector
        return {
            "object": "list",
            "model": search.clip_name,
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": 0, "total_tokens": 0},  # CLIP tokens are not billed
        }

    @api.post("/v1/search")
    async def search_index(request: Request):
        body = await parse_body(request, SearchRequest)
        if (body.query is None) == (body.image is None):
            raise ApiError(400, 'give "query" (text) or "image" (a data: URL), one of them', param="query")
        if body.query is not None:
            hits = await run_in_threadpool(search.search_text, body.query, body.k)
        else:
            image = (await run_in_threadpool(policy.load, [body.image], param="image"))[0]
            hits = await run_in_threadpool(search.search_image, image, body.k)
        base, root = str(request.url_for("thumbnail")), search.root
        paths = [_relative(h.path, root) for h in hits]
        return {
            "object": "list",
            "data": [
                {"path": p, "score": float(h.score), "thumbnail_url": f"{base}?path={quote(p)}"}
                for p, h in zip(paths, hits)
            ],
        }

    @api.get("/v1/thumbnails", name="thumbnail")
    async def thumbnail(path: str):
        try:
            jpeg = await run_in_threadpool(search.thumbnail, str(search.root / path))  # checked: indexed, inside
        except KeyError:
            raise ApiError(404, "no such image in the index", param="path") from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return api


def _relative(path: str, root: Path) -> str:
    """A hit's path relative to the indexed folder: clients learn nothing of the server's disk."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def _submit(scheduler, turns, images, config, stop):
    try:
        return scheduler.submit(turns, images, config, stop=stop)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    except RuntimeError:
        raise ApiError(503, "the model is shutting down; try again") from None


def _encode_vector(vector, encoding: str):
    array = np.asarray(vector, dtype="<f4")
    return base64.b64encode(array.tobytes()).decode() if encoding == "base64" else array.tolist()


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    **options,
) -> None:
    """Run the API with uvicorn until interrupted; on SIGINT/SIGTERM running requests finish
    (up to SHUTDOWN_TIMEOUT seconds), then the models' schedulers close.

    Raises:
        VlmError: a non-loopback `host` without `api_key` (refused: anyone who can reach
            the address could use the models), or an address that cannot be served.
    """
    import uvicorn

    if not is_loopback(host) and not api_key:
        raise VlmError(
            f"--host {host} lets other machines connect: set an API key too (--api-key KEY or VLMSTACK_API_KEY)"
        )
    check_bind(host, port)
    api = build_api(api_key=api_key, loopback_only=is_loopback(host), **options)
    config = uvicorn.Config(
        api, host=host, port=port, access_log=False, timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT), log_level="info"
    )
    log.info("serving the OpenAI-compatible API on http://%s:%d/v1%s", host, port, "" if api_key else " (no API key)")
    uvicorn.Server(config).run()
