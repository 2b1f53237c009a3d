"""The vlmstack web app: search, visual chat and captioning in one Gradio Blocks page.

    vlmstack app [--index INDEX] [--host 127.0.0.1] [--port 7860]

Without --index the Search tab uses an index of the easy-VQA test images, built once
and cached. Models load on first use and stay loaded. The server binds to 127.0.0.1
unless told otherwise, refuses uploads over `max_file_size`, runs at most
`concurrency` requests at a time, and shows errors as messages, never tracebacks.
Search results are sent as pictures, never as file paths the browser could ask for, and
only files the index holds inside its folder are opened. Chat text is only ever text: the
files a message uses are the ones uploaded with it.
"""

import functools
import logging
import os
import threading
from pathlib import Path

import gradio as gr

from retrieval import Searcher, build_index
from retrieval.store import MANIFEST, read_manifest
from vlm.data import easyvqa
from vlm.data.conversations import DEFAULT_CAPTION_PROMPT
from vlm.data.webdataset import image_source
from vlm.errors import ImageError, VlmError
from vlm.hub import WEIGHTS_DIR, model_kind, shipped_names
from vlm.images import load_image
from vlm.lm import IMAGE_TOKEN
from vlm.load import VQA_KINDS, load_vlm

log = logging.getLogger(__name__)
MAX_FILE_SIZE = "10mb"
MAX_CAPTION_FILES = 64


def default_index() -> Path:
    """An index of the easy-VQA test images in the user's cache, built on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmstack" / "easyvqa-test.index"
    if not (cache / MANIFEST).is_file():
        log.info("building the demo index of the easy-VQA test images in %s", cache)
        build_index(easyvqa.image_dir("test"), cache, progress=False)
    return cache


def vqa_model_names() -> list[str]:
    return [n for n in shipped_names() if model_kind(WEIGHTS_DIR / n) in VQA_KINDS]


class Models:
    """Loaded VQA models by name, loaded once each (thread-safe)."""

    def __init__(self):
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        with self._lock:
            if name not in self._models:
                self._models[name] = load_vlm(name)
            return self._models[name]


def readable_errors(fn):
    """Show user errors as their message and anything else as a short note, never a traceback."""

    def convert(e: Exception) -> gr.Error:
        if isinstance(e, (VlmError, ValueError)):
            return gr.Error(str(e))
        log.exception("request failed")
        return gr.Error(f"Something went wrong ({type(e).__name__}). The server log has the details.")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise convert(e) from None

    @functools.wraps(fn)
    def generator_wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise convert(e) from None

    import inspect

    return generator_wrapper if inspect.isgeneratorfunction(fn) else wrapper


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


def served_pictures(engine: Searcher, hits) -> list[tuple]:
    """(picture, "score  relative path") per hit the index holds inside its folder and that
    still reads; the others are left out and logged."""
    pictures = []
    for hit in hits:
        path = engine.resolve(hit.path)
        if path is None:
            log.warning("not serving %s: it resolves outside the indexed folder", hit.path)
            continue
        try:
            picture = load_image(image_source(str(path)))
        except (ImageError, VlmError) as e:
            log.warning("search hit skipped: %s", e)
            continue
        pictures.append((picture, f"{hit.score:.3f}  {os.path.relpath(hit.path, engine.root)}"))
    return pictures


def build_app(*, index: str | Path | None = None, concurrency: int = 2) -> gr.Blocks:
    """The app's page. Raises VlmError when `index` is not an index."""
    if index is not None:
        read_manifest(index)  # a mistyped --index fails now, not at the first search
    models = Models()
    searcher_cache: list[Searcher] = []
    searcher_lock = threading.Lock()

    def searcher() -> Searcher:
        with searcher_lock:  # two first searches must not both build the default index
            if not searcher_cache:
                searcher_cache.append(Searcher.open(index or default_index()))
            return searcher_cache[0]

    @readable_errors
    def search(query: str, image, k: float):
        query = (query or "").strip()
        if not query and image is None:
            raise gr.Error("Type a query, add an image, or both.")
        engine = searcher()
        if image is not None:
            hits = engine.search_image(image, k=int(k), text=query or None)
        else:
            hits = engine.search_text(query, k=int(k))
        return served_pictures(engine, hits)

    @readable_errors
    def chat(message: dict, history: list[dict], model_name: str):
        uploads = [{"type": "file", "file": {"path": _file_path(f)}} for f in message.get("files", [])]
        turns, images = history_to_turns(history + [{"role": "user", "content": [*uploads, {"type": "text", "text": message.get("text", "")}]}])
        if not turns or turns[-1][0] != "user":
            raise gr.Error("Ask a question (you can attach images).")
        pictures = [load_image(path) for path in images]
        reply = ""
        for piece in models.get(model_name).chat(turns, pictures, stream=True, max_new_tokens=64):
            reply += piece
            yield reply

    @readable_errors
    def caption(files: list, model_name: str, prompt: str):
        if not files:
            raise gr.Error("Upload one or more images.")
        if len(files) > MAX_CAPTION_FILES:
            raise gr.Error(f"At most {MAX_CAPTION_FILES} images at a time; use `vlmstack caption` for folders.")
        rows, pictures, slots = [], [], []
        for item in files:
            path = _file_path(item)
            try:
                pictures.append(load_image(path))
                slots.append(len(rows))
                rows.append([Path(path).name, ""])
            except ImageError as e:
                rows.append([Path(path).name, f"(unreadable: {str(e).split(': ', 1)[-1]})"])
        captions = models.get(model_name).answer_batch(pictures, [prompt or DEFAULT_CAPTION_PROMPT] * len(pictures), max_new_tokens=32)
        for slot, text in zip(slots, captions):
            rows[slot][1] = text
        return rows

    names = vqa_model_names()
    with gr.Blocks(title="vlmstack") as app:
        gr.Markdown("# vlmstack\nSearch images by text or example, ask questions about pictures, caption them.")
        with gr.Tab("Search"):
            with gr.Row():
                query = gr.Textbox(label="Query", placeholder='a red circle   ·   "red circle - triangle"   ·   "2:red + circle"', scale=4)
                k = gr.Slider(1, 50, value=12, step=1, label="Results", scale=1)
            query_image = gr.Image(label="Find images like this one (optional)", type="pil", height=160)
            search_button = gr.Button("Search", variant="primary")
            gallery = gr.Gallery(label="Results (score, path)", columns=6, height="auto")
            search_button.click(search, [query, query_image, k], gallery, api_name="search")
            query.submit(search, [query, query_image, k], gallery, api_name=False)
        with gr.Tab("Chat"):
            model = gr.Dropdown(names, value=names[0] if names else None, label="Model", allow_custom_value=True)
            gr.ChatInterface(
                chat,
                multimodal=True,
                textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple", placeholder="Attach images and ask about them"),
                additional_inputs=[model],
                api_name="chat",
                fill_height=False,
            )
        with gr.Tab("Caption"):
            with gr.Row():
                caption_model = gr.Dropdown(names, value=names[0] if names else None, label="Model", allow_custom_value=True)
                caption_prompt = gr.Textbox(DEFAULT_CAPTION_PROMPT, label="Instruction")
            files = gr.File(file_count="multiple", file_types=["image"], label="Images")
            caption_button = gr.Button("Caption", variant="primary")
            table = gr.Dataframe(headers=["file", "caption"], label="Captions", wrap=True)
            caption_button.click(caption, [files, caption_model, caption_prompt], table, api_name="caption")
    app.queue(default_concurrency_limit=concurrency, max_size=128)
    return app


def launch(*, index: str | None = None, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Start the app; with block=False return once it serves (tests, scripts)."""
    app = build_app(index=index)
    try:
        app.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, prevent_thread_lock=not block, show_error=False, quiet=not block)
    except OSError as e:  # the port is taken, or the host is not this machine's
        raise VlmError(f"cannot serve on {host}:{port} ({e}); choose another --port") from None
    return app
