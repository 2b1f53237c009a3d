"""The vlmstack web app: search, visual chat and captioning in one Gradio Blocks page.

    vlmstack app [--index INDEX] [--model DIR|hf:ORG/NAME ...] [--host 127.0.0.1] [--port 7860] [--allow-remote]

Without --index the Search tab uses an index of the easy-VQA test images, built once
and cached. The chat and caption tabs offer the shipped VQA models and those given with
--model, nothing else (an hf:ORG/NAME is downloaded once, at start-up); at most
`MODELS_LOADED` stay loaded (least recently used go). A model whose LM runs its own code
loads only with --trust-remote-code.
The server binds to 127.0.0.1 unless told otherwise (another address needs
--allow-remote, and the page then says it is reachable), refuses uploads over
`MAX_FILE_SIZE`, deletes uploads an hour after they arrive, runs at most `concurrency`
requests at a time, and shows errors as one line without server paths.
Search results are sent as pictures, never as file paths the browser could ask for, and
only files the index holds inside its folder are opened. Searches share one
SearchService (apps/search_service.py): concurrent queries are encoded in one batch and
results are cached thumbnails, so a search takes milliseconds and runs beside the chat
and caption requests instead of queueing behind them. Chat text is only ever text:
the only files a request reads are ones uploaded to the app (apps/web_safety.py).

The `/chat` API (gradio_client: `predict(message, model, history=[...], api_name="/chat")`)
is stateless: each call answers `message` after the `history` it is given (default none),
whatever the client's session holds. With `--api` the same process also serves
`vlmstack serve`'s OpenAI-compatible API under `API_PATH` (/openai/v1/...), its searches on
the app's SearchService.
"""

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import torch
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware
from starlette.routing import Mount

from apps.search_service import SearchService
from apps.web_safety import (
    LOOPBACK_HOSTS,
    SameOriginOnly,
    UploadedImage,
    check_bind,
    header_pixels,
    is_loopback,
    load_uploads,
    readable_errors,
    uploaded_file,
)
from retrieval import Searcher, build_index
from retrieval.store import MANIFEST, read_manifest
from vlm import download
from vlm.data import easyvqa
from vlm.data.conversations import DEFAULT_CAPTION_PROMPT
from vlm.errors import ImageError, VlmError
from vlm.hub import WEIGHTS_DIR, model_kind, resolve_dir, shipped_names
from vlm.images import load_image
from vlm.lm import IMAGE_TOKEN
from vlm.load import VQA_KINDS, is_vqa_directory, load_vlm

log = logging.getLogger(__name__)
MAX_FILE_SIZE = "10mb"
MAX_CAPTION_FILES = 64
MAX_IMAGES_PER_MESSAGE = 4
MAX_IMAGES_PER_REQUEST = 16  # a conversation's images, all turns
MAX_REQUEST_PIXELS = 32_000_000  # decoded pixels per request: 8000x8000 alone would be 64M
MODELS_LOADED = 2
CONCURRENCY = 2  # chat and caption requests run at once; the rest queue
SEARCH_CONCURRENCY = 32  # searches run at once (they mostly wait for the shared, batched CLIP)
UPLOAD_MAX_AGE = 3600  # seconds an upload is kept
API_PATH = "/openai"  # where --api mounts the OpenAI-compatible API (base URL: /openai/v1)


def default_index() -> Path:
    """An index of the easy-VQA test images in the user's cache, built on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmstack" / "easyvqa-test.index"
    if not (cache / MANIFEST).is_file():
        log.info("building the demo index of the easy-VQA test images in %s", cache)
        build_index(easyvqa.image_dir("test"), cache, progress=False)
    return cache


def vqa_model_names() -> list[str]:
    return [n for n in shipped_names() if model_kind(WEIGHTS_DIR / n) in VQA_KINDS]


def check_vqa_models(specs: list[str]) -> list[str]:
    """The names the app offers: the shipped VQA names and the `specs` (see vqa_model_sources)."""
    return list(vqa_model_sources(specs))


def vqa_model_sources(specs: list[str]) -> dict[str, str]:
    """Model name -> what load_vlm loads, for the shipped VQA names and the `specs` given
    on the command line (each checked to be a VQA model directory; an hf:ORG/NAME is
    downloaded now, and its name stays the spec). Raises VlmError naming a spec that is not."""
    sources = {name: name for name in vqa_model_names()}
    for spec in specs:
        directory = download.download(spec) if download.is_hub_spec(spec) else resolve_dir(spec)
        if directory is None or not is_vqa_directory(directory):
            raise VlmError(
                f"--model {spec}: not a LLaVA or Flamingo model directory, nor a Hugging Face LLaVA checkpoint"
            )
        sources.setdefault(spec, str(directory) if download.is_hub_spec(spec) else spec)
    return sources


class Models:
    """Loaded VQA models by name, from a fixed list of allowed names (each mapped to what
    load_vlm loads); at most `capacity` stay loaded (the least recently used is dropped).
    Thread-safe."""

    def __init__(
        self,
        sources: dict[str, str],
        *,
        capacity: int = MODELS_LOADED,
        trust_remote_code: bool = False,
        dtype: str = "float32",
    ):
        self.sources, self.capacity = dict(sources), capacity
        self.trust_remote_code, self.dtype = trust_remote_code, dtype
        self.allowed = list(self.sources)
        self._models: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str):
        """Raises VlmError for a name that is not allowed (without looking at the disk)."""
        if name not in self.allowed:
            raise VlmError(f"unknown model {str(name)[:80]!r}; choose one of: {', '.join(self.allowed)}")
        with self._lock:
            if name not in self._models:
                self._models[name] = load_vlm(
                    self.sources[name], trust_remote_code=self.trust_remote_code, dtype=self.dtype
                )
            self._models.move_to_end(name)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return self._models[name]

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)


def _file_path(item) -> str | None:
    """A file path out of the shapes Gradio uses for files in messages."""
    if isinstance(item, str):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], str):
        return item[0]
    if isinstance(item, dict):
        if isinstance(item.get("path"), str):
            return item["path"]
        if isinstance(item.get("file"), dict):
            return item["file"].get("path")
    return getattr(item, "path", None)


def history_to_turns(history: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """Gradio chat history (content as a string, a file, or a list of both) -> our turns
    with an <image> placeholder per file, and the files in order."""
    turns: list[tuple[str, str]] = []
    images: list[str] = []
    for message in history:
        role, content = message["role"], message["content"]
        parts = content if isinstance(content, list) else [content]
        text, files = [], []
        for part in parts:
            if isinstance(part, dict) and part.get("type") == "text":
                text.append(part.get("text", ""))
            elif isinstance(part, str):  # never a path: a typed path must not open a server file
                text.append(part)
            elif _file_path(part):
                files.append(_file_path(part))
        if role == "user" and files:
            images += files
            text.insert(0, "\n".join([IMAGE_TOKEN] * len(files)))
        body = "\n".join(t for t in text if t)
        if turns and turns[-1][0] == role:  # Gradio sends a file and its text as two messages
            turns[-1] = (role, f"{turns[-1][1]}\n{body}".strip())
        elif body:
            turns.append((role, body))
    return turns, images


def served_pictures(engine: SearchService | Searcher, hits) -> list[tuple]:
    """(thumbnail file, "score  relative path") per hit the index holds inside its folder
    and that still reads; the others are left out and logged. The thumbnails are cached
    by `engine` and written once into Gradio's cache folder, which Gradio serves as is
    (no re-encoding or copying per request)."""
    pictures = []
    for hit in hits:
        try:
            thumbnail = engine.thumbnail(hit.path)
        except KeyError:
            log.warning("not serving %s: it resolves outside the indexed folder", hit.path)
            continue
        except VlmError as e:
            log.warning("search hit skipped: %s", e)
            continue
        file = _thumbnail_file(thumbnail, Path(hit.path).stem)
        pictures.append((file, f"{hit.score:.3f}  {os.path.relpath(hit.path, engine.root)}"))
    return pictures


def _thumbnail_file(data: bytes, stem: str) -> str:
    """`data` as a JPEG file in Gradio's cache folder, named by its hash; written once and
    touched on reuse (the app's delete_cache ages files by their change time)."""
    path = Path(get_upload_folder()) / "vlmstack-thumbnails" / hashlib.sha256(data).hexdigest()[:32] / f"{stem}.jpg"
    try:
        os.utime(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{threading.get_ident()}")
        staging.write_bytes(data)
        os.replace(staging, path)  # concurrent writers of the same picture never expose half a file
    return str(path)


def build_app(
    *,
    index: str | Path | None = None,
    models: list[str] = (),
    concurrency: int = CONCURRENCY,
    remote_host: str | None = None,
    upload_max_age: int = UPLOAD_MAX_AGE,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    search: SearchService | None = None,
) -> gr.Blocks:
    """The app's page. `models`: VQA model directories (or hf:ORG/NAME) offered beside the
    shipped ones; `remote_host`: the non-loopback address served, which the page warns
    about; `trust_remote_code`: let a model's LM run Python code saved with it; `dtype`:
    the models' compute dtype (vlm.load.compute_dtype); `search`: the SearchService to use
    (default: one made at the first search, on `index` or the demo index).

    Raises:
        VlmError: `index` is not an index, or a `models` entry is not a VQA model.
    """
    if index is not None:
        read_manifest(index)  # a mistyped --index fails now, not at the first search
    sources = vqa_model_sources(list(models))
    names = list(sources)
    loaded = Models(sources, trust_remote_code=trust_remote_code, dtype=dtype)
    service_cache: list[SearchService] = [search] if search is not None else []
    service_lock = threading.Lock()

    def search_service() -> SearchService:
        with service_lock:  # two first searches must not both build the default index
            if not service_cache:
                service_cache.append(SearchService(index=index or default_index()))
            return service_cache[0]

    @readable_errors
    def search(query: str, image: str | None, k: float):
        query = (query or "").strip()
        if not query and image is None:
            raise gr.Error("Type a query, add an image, or both.")
        engine = search_service()
        if image is not None:
            [picture] = load_uploads([image], max_images=1, max_pixels=MAX_REQUEST_PIXELS)
            hits = engine.search_image(picture, int(k), text=query or None)
        else:
            hits = engine.search_text(query, int(k))
        return served_pictures(engine, hits)

    @readable_errors
    def chat(message: dict, history: list[dict] | None, model_name: str):
        """Streams the reply to `message` after `history` (Gradio's message dicts)."""
        message = message or {}
        files = [_file_path(f) for f in message.get("files") or []]
        if len(files) > MAX_IMAGES_PER_MESSAGE:
            raise gr.Error(f"{len(files)} images in one message: at most {MAX_IMAGES_PER_MESSAGE}")
        uploads = [{"type": "file", "file": {"path": path}} for path in files]
        question = {"role": "user", "content": [*uploads, {"type": "text", "text": message.get("text") or ""}]}
        turns, images = history_to_turns(list(history or []) + [question])
        if not turns or turns[-1][0] != "user":
            raise gr.Error("Ask a question (you can attach images).")
        model = loaded.get(model_name)  # an unknown name fails before any file is read
        pictures = load_uploads(images, max_images=MAX_IMAGES_PER_REQUEST, max_pixels=MAX_REQUEST_PIXELS)
        reply = ""
        for piece in model.chat(turns, pictures, stream=True, max_new_tokens=64):
            reply += piece
            yield reply

    def chat_api(message: dict, model_name: str, history: list | None):
        yield from chat(message, history, model_name)

    @readable_errors
    def caption(files: list, model_name: str, prompt: str):
        if not files:
            raise gr.Error("Upload one or more images.")
        if len(files) > MAX_CAPTION_FILES:
            raise gr.Error(f"At most {MAX_CAPTION_FILES} images at a time; use `vlmstack caption` for folders.")
        model = loaded.get(model_name)
        rows, pictures, slots = [], [], []
        budget = MAX_REQUEST_PIXELS
        for item in files:
            name = Path(str(_file_path(item))).name
            try:
                file = uploaded_file(_file_path(item) or "")
                budget -= header_pixels(file)
                if budget < 0:
                    rows.append([name, f"(skipped: over {MAX_REQUEST_PIXELS / 1e6:.0f} megapixels in one request)"])
                    continue
                pictures.append(load_image(file))
                slots.append(len(rows))
                rows.append([name, ""])
            except (ImageError, gr.Error) as e:
                reason = e.message if isinstance(e, gr.Error) else str(e)
                rows.append([name, f"(unreadable: {reason.split(': ', 1)[-1]})"])
        if pictures:
            captions = model.answer_batch(
                pictures, [prompt or DEFAULT_CAPTION_PROMPT] * len(pictures), max_new_tokens=32
            )
            for slot, text in zip(slots, captions):
                rows[slot][1] = text
        return rows

    limits = (
        f"Up to {MAX_IMAGES_PER_MESSAGE} images per message and {MAX_REQUEST_PIXELS // 1_000_000} megapixels per request; "
        f"uploads over {MAX_FILE_SIZE} are refused and uploads are deleted after {upload_max_age // 60} minutes."
    )
    with gr.Blocks(title="vlmstack", delete_cache=(max(1, upload_max_age // 4), upload_max_age)) as app:
        gr.Markdown("# vlmstack\nSearch images by text or example, ask questions about pictures, caption them.")
        if remote_host:
            gr.Markdown(
                f"**Warning: this app is served on {remote_host}: anyone who can reach that address can use it, "
                "read its search results and run its models.**"
            )
        with gr.Tab("Search"):
            with gr.Row():
                query = gr.Textbox(
                    label="Query",
                    placeholder='a red circle   ·   "red circle - triangle"   ·   "2:red + circle"',
                    scale=4,
                )
                k = gr.Slider(1, 50, value=12, step=1, label="Results", scale=1)
            query_image = UploadedImage(
                label="Find images like this one (optional)", type="filepath", image_mode=None, height=160
            )
            search_button = gr.Button("Search", variant="primary")
            gallery = gr.Gallery(label="Results (score, path)", columns=6, height="auto")
            # Searches have their own concurrency group: they must not wait behind the
            # CONCURRENCY chat and caption requests, and the shared CLIP batches them.
            searching = {"concurrency_limit": SEARCH_CONCURRENCY, "concurrency_id": "search"}
            search_button.click(search, [query, query_image, k], gallery, api_name="search", **searching)
            query.submit(search, [query, query_image, k], gallery, api_name=False, **searching)
        with gr.Tab("Chat"):
            model = gr.Dropdown(names, value=names[0] if names else None, label="Model")
            gr.ChatInterface(
                chat,
                multimodal=True,
                textbox=gr.MultimodalTextbox(
                    file_types=["image"], file_count="multiple", placeholder="Attach images and ask about them"
                ),
                additional_inputs=[model],
                api_name="chat_session",
                api_visibility="private",  # its API keeps history per session; /chat below does not
                fill_height=False,
            )
            gr.Markdown(limits)
            api_message = gr.MultimodalTextbox(visible=False)
            api_history = gr.JSON(value=[], visible=False)
            api_reply = gr.Textbox(visible=False)
            gr.Button(visible=False).click(chat_api, [api_message, model, api_history], api_reply, api_name="chat")
        with gr.Tab("Caption"):
            with gr.Row():
                caption_model = gr.Dropdown(names, value=names[0] if names else None, label="Model")
                caption_prompt = gr.Textbox(DEFAULT_CAPTION_PROMPT, label="Instruction")
            files = gr.File(file_count="multiple", file_types=["image"], label="Images")
            caption_button = gr.Button("Caption", variant="primary")
            table = gr.Dataframe(headers=["file", "caption"], label="Captions", wrap=True)
            caption_button.click(caption, [files, caption_model, caption_prompt], table, api_name="caption")
    app.queue(default_concurrency_limit=concurrency, max_size=128)
    app.models = loaded  # for tests and benchmarks: which models are loaded
    return app


def launch(
    *,
    index: str | None = None,
    models: list[str] = (),
    host: str = "127.0.0.1",
    port: int = 7860,
    allow_remote: bool = False,
    block: bool = True,
    upload_max_age: int = UPLOAD_MAX_AGE,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    api: bool = False,
    api_key: str | None = None,
) -> gr.Blocks:
    """Start the app; with block=False return once it serves (tests, scripts). With `api`,
    also serve the OpenAI-compatible API (apps/server.py) under API_PATH, behind `api_key`.

    Raises:
        VlmError: a non-loopback `host` without `allow_remote` (or, with `api`, without
            `api_key`), an address that cannot be served, a bad index or model.
    """
    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise VlmError(
            f"--host {host} would let other machines use the app; add --allow-remote if that is what you want"
        )
    if remote and api and not api_key:
        raise VlmError(f"--api on --host {host} lets other machines use the API: set an API key too (--api-key KEY)")
    check_bind(host, port)
    # Requests run side by side; torch threads beyond the cores they share starve the
    # server's own thread, and clients' uploads then time out (see
    # docs/benchmarks/app_concurrency.md).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // CONCURRENCY))
    search, routes = None, []
    if api:
        from apps.server import build_api

        search = SearchService(index=index or default_index())
        served = build_api(
            models=models,
            api_key=api_key,
            loopback_only=not remote,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            search=search,
        )
        routes = [Mount(API_PATH, app=served)]
        log.info("serving the OpenAI-compatible API on http://%s:%d%s/v1", host, port, API_PATH)
    app = build_app(
        index=index,
        models=models,
        remote_host=host if remote else None,
        upload_max_age=upload_max_age,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        search=search,
    )
    guard = Middleware(SameOriginOnly, hosts=None if remote else LOOPBACK_HOSTS)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            max_file_size=MAX_FILE_SIZE,
            prevent_thread_lock=not block,
            show_error=False,
            quiet=not block,
            app_kwargs={"middleware": [guard], "routes": routes},
        )
    except OSError as e:  # lost a race for the port since check_bind
        raise VlmError(f"cannot serve on {host}:{port} ({e})") from None
    return app
