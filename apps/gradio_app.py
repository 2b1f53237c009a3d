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

import csv
import hashlib
import io
import json
import logging
import os
import statistics
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import torch
from gradio.utils import get_upload_folder
from PIL import Image
from starlette.middleware import Middleware
from starlette.routing import Mount

from apps.heatmap import METHOD, answer_saliency, draw
from apps.model_panel import ModelFacts, example_messages
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
from vlm.quantize import Precision, clip_precision

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
DEFAULT_VQA_MODEL = "llava-easyvqa"  # the CLI's default (`vlmstack caption --model`)
CAPTION_BATCH = 8  # pictures per forward pass on the Caption tab (progress moves per batch)
# "Usual best" of an index: the median best score of these generic queries, which name
# nothing in particular. A text query whose best hit scores below it matches no picture
# better than "a picture" does, and is flagged "no close match".
PROBE_QUERIES = ("a picture", "an image", "a photo", "something", "a thing")
QUERY_SYNTAX = (
    'Query syntax: terms joined by " + " or " - " (spaces around the sign), each optionally weighted: '
    '`red circle - triangle` moves away from triangles, `2:red + circle` counts "red" twice.'
)


def default_index_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmstack" / "easyvqa-test.index"


def default_index(*, progress: bool = False) -> Path:
    """An index of the easy-VQA test images in the user's cache, built on first use."""
    cache = default_index_dir()
    if not (cache / MANIFEST).is_file():
        log.info("building the demo index of the easy-VQA test images in %s", cache)
        build_index(easyvqa.image_dir("test"), cache, progress=progress)
    return cache


def vqa_model_names() -> list[str]:
    """The shipped VQA models, the CLI's default first."""
    names = [n for n in shipped_names() if model_kind(WEIGHTS_DIR / n) in VQA_KINDS]
    return sorted(names, key=lambda n: n != DEFAULT_VQA_MODEL)


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
        precision: Precision = Precision(),
    ):
        self.sources, self.capacity = dict(sources), capacity
        self.trust_remote_code, self.precision = trust_remote_code, precision
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
                    self.sources[name],
                    trust_remote_code=self.trust_remote_code,
                    dtype=self.precision.dtype,
                    quantize=self.precision.quantize,
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


def served_pictures(engine: SearchService | Searcher, hits) -> tuple[list[tuple], list[str]]:
    """(thumbnail file, "score  relative path") per hit the index holds inside its folder
    and that still reads, and those hits' paths; the others are left out and logged. The thumbnails are cached
    by `engine` and written once into Gradio's cache folder, which Gradio serves as is
    (no re-encoding or copying per request)."""
    pictures, paths = [], []
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
        paths.append(hit.path)
    return pictures, paths


def _map_file(picture: Image.Image, saliency) -> str:
    """A heatmap (apps/heatmap.draw) as a PNG file in Gradio's cache folder."""
    buffer = io.BytesIO()
    draw(picture, saliency).save(buffer, format="PNG")
    return _thumbnail_file(buffer.getvalue(), "where-it-looked")


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


CSS = """
.panel { background: var(--block-background-fill); border-left: 4px solid var(--color-accent); padding: 4px 12px; }
#chatbot .image-frame img { width: 192px; height: 192px; max-height: none; object-fit: contain !important; image-rendering: pixelated; }
"""
# Run after each search: its results start at the top, in view (not at the old scroll position).
SCROLL_RESULTS_TO_TOP = """() => {
  const results = document.getElementById("results");
  if (!results) return;
  for (const el of [results, ...results.querySelectorAll("*")]) if (el.scrollTop > 0) el.scrollTop = 0;
  if (results.getBoundingClientRect().top < 0) results.scrollIntoView({block: "start"});
}"""


def _caption_files(rows: list[list[str]]) -> tuple[str, str]:
    """The captions as captions.csv and captions.jsonl ({"image", "caption"} rows, the
    repo's caption format) in a fresh folder of Gradio's cache, which serves them."""
    folder = Path(get_upload_folder()) / "vlmstack-captions" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    with open(folder / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    lines = [json.dumps({"image": name, "caption": text}) + "\n" for name, text in rows]
    (folder / "captions.jsonl").write_text("".join(lines))
    return str(folder / "captions.csv"), str(folder / "captions.jsonl")


def build_app(
    *,
    index: str | Path | None = None,
    models: list[str] = (),
    concurrency: int = CONCURRENCY,
    remote_host: str | None = None,
    upload_max_age: int = UPLOAD_MAX_AGE,
    trust_remote_code: bool = False,
    precision: Precision = Precision(),
    search: SearchService | None = None,
) -> gr.Blocks:
    """The app's page. `models`: VQA model directories (or hf:ORG/NAME) offered beside the
    shipped ones; `remote_host`: the non-loopback address served, which the page warns
    about; `trust_remote_code`: let a model's LM run Python code saved with it; `precision`:
    how the VQA models and the search CLIP compute (--dtype, --quantize); `search`: the
    SearchService to use (default: one made at the first search, on `index` or the demo index).

    Raises:
        VlmError: `index` is not an index, or a `models` entry is not a VQA model.
    """
    if index is not None:
        read_manifest(index)  # a mistyped --index fails now, not at the first search
    sources = vqa_model_sources(list(models))
    names = list(sources)
    facts = {name: ModelFacts(name, sources[name]) for name in names}
    loaded = Models(sources, trust_remote_code=trust_remote_code, precision=precision)
    service_cache: list[SearchService] = [search] if search is not None else []
    service_lock = threading.Lock()
    usual_best: dict[int, float] = {}

    def search_service(progress: bool = False) -> SearchService:
        with service_lock:  # two first searches must not both build the default index
            if not service_cache:
                with clip_precision(precision):
                    service_cache.append(SearchService(index=index or default_index(progress=progress)))
            return service_cache[0]

    def index_ready() -> bool:
        return bool(service_cache) or index is not None or (default_index_dir() / MANIFEST).is_file()

    def usual_best_score(engine: SearchService) -> float:
        """The index's usual best: the median best score of PROBE_QUERIES (computed once)."""
        if id(engine) not in usual_best:
            usual_best[id(engine)] = statistics.median(engine.search_text(q, 1)[0].score for q in PROBE_QUERIES)
        return usual_best[id(engine)]

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
        return hits

    def search_api(query: str, image: str | None, k: float):
        return served_pictures(search_service(), search(query, image, k))[0]

    def search_page(query: str, image: str | None, k: float, progress=gr.Progress(track_tqdm=True)):
        """The Search tab: (gallery, status line, the search as a state for match maps,
        the match map cleared); the first search says it builds the index."""
        if not index_ready():
            yield (
                gr.skip(),
                "Building the demo index of the 1,000 easy-VQA test pictures (first search only)…",
                {},
                None,
            )
            search_service(progress=True)
        try:
            hits = search(query, image, k)
        except gr.Error as e:
            yield [], f"⚠ {e.message}", {}, None
            return
        engine = search_service()
        status = f"{len(hits)} results · best score {hits[0].score:.3f}" if hits else "No results."
        unknown = ModelFacts(engine.clip_name).unknown_words(query or "")
        if hits and unknown:
            status = (
                f"**No close match**: {engine.clip_name} learned only the words of its training captions "
                f"(a colour and a shape: {', '.join(easyvqa.COLORS)}; {', '.join(easyvqa.SHAPES)}) and never saw "
                + ", ".join(f"“{w}”" for w in unknown[:5])
                + ", so these results are guesses."
            )
        elif hits and image is None:
            usual = usual_best_score(engine)
            if hits[0].score < usual:
                status = (
                    f"**No close match**: the best score, {hits[0].score:.3f}, is below this index's usual best "
                    f"({usual:.3f}, what a generic query like “a picture” reaches). Check the spelling, "
                    "or describe a colour and a shape."
                )
        pictures, paths = served_pictures(engine, hits)
        searched = {"query": (query or "").strip() or None, "image": image, "paths": paths}
        yield pictures, status, searched, None

    @readable_errors
    def match_map(searched: dict, selected: gr.SelectData) -> tuple[str, str]:
        """(file, note): where the clicked hit matches the search that found it."""
        paths = (searched or {}).get("paths") or []
        if not isinstance(selected.index, int) or not 0 <= selected.index < len(paths):
            raise gr.Error("Search again, then click a result.")
        image = searched.get("image")
        example = load_uploads([image], max_images=1, max_pixels=MAX_REQUEST_PIXELS)[0] if image else None
        picture, saliency = search_service().match_map(paths[selected.index], query=searched["query"], image=example)
        return _map_file(picture, saliency), f"Where the result matches the search, by {METHOD}."

    def chat_parts(message: dict) -> tuple[list[str], str]:
        message = message or {}
        return [_file_path(f) for f in message.get("files") or []], (message.get("text") or "").strip()

    @readable_errors
    def chat(message: dict, history: list[dict] | None, model_name: str):
        """Streams the reply to `message` after `history` (Gradio's message dicts). A model
        trained only on pictures answers a conversation without one with a notice."""
        files, text = chat_parts(message)
        if len(files) > MAX_IMAGES_PER_MESSAGE:
            raise gr.Error(f"{len(files)} images in one message: at most {MAX_IMAGES_PER_MESSAGE}")
        uploads = [{"type": "file", "file": {"path": path}} for path in files]
        question = {"role": "user", "content": [*uploads, {"type": "text", "text": text}]}
        turns, images = history_to_turns(list(history or []) + [question])
        if not turns or turns[-1][0] != "user":
            raise gr.Error("Ask a question (you can attach images).")
        model = loaded.get(model_name)  # an unknown name fails before any file is read
        pictures = load_uploads(images, max_images=MAX_IMAGES_PER_REQUEST, max_pixels=MAX_REQUEST_PIXELS)
        if not pictures and facts[model_name].image_only:
            yield facts[model_name].no_image_notice()
            return
        reply = ""
        for piece in model.chat(turns, pictures, stream=True, max_new_tokens=64):
            reply += piece
            yield reply  # when the page's Stop cancels the event, this generator is never resumed

    def chat_api(message: dict, model_name: str, history: list | None):
        yield from chat(message, history, model_name)

    def label(reply: str, model_name: str, images: int) -> str:
        """An answer as shown: the model's name, and which picture it is about when there are several."""
        about = ""
        if images > 1:
            about = (
                f" · about image {images}, the latest"
                if facts[model_name].kind == "flamingo"
                else f" · sees all {images} images"
            )
        return f"{reply}\n\n<sub>— {model_name}{about}</sub>"

    def shown(conversation: list[dict]) -> list[dict]:
        """The conversation as the Chatbot shows it: pictures as pictures, answers labelled
        (and followed by their heatmap when one was asked for)."""
        return [
            {
                "role": "assistant",
                "content": [label(m["content"], m["model"], m["images"])]
                + ([{"path": m["heatmap"]}] if m.get("heatmap") else []),
            }
            if m["role"] == "assistant"
            else {"role": "user", "content": [_shown_part(p) for p in m["content"]]}
            for m in conversation
        ]

    def _shown_part(part: dict):
        return {"path": _file_path(part)} if _file_path(part) else part.get("text", "")

    def heatmap(model_name: str, conversation: list[dict]) -> tuple[str | None, str]:
        """(file, note) of where the model looked for the last answer, on the latest picture."""
        paths = [_file_path(p) for m in conversation if m["role"] == "user" for p in m["content"] if _file_path(p)]
        if not paths:
            return None, ""
        question = next(p["text"] for p in reversed(conversation[-2]["content"]) if "text" in p)
        [picture] = load_uploads(paths[-1:], max_images=1, max_pixels=MAX_REQUEST_PIXELS)
        saliency = answer_saliency(loaded.get(model_name), picture, question, conversation[-1]["content"])
        return _map_file(picture, saliency), f"Where the model looked, by {METHOD}."

    def chat_page(message: dict, conversation: list[dict] | None, model_name: str, explain: bool = False):
        """The Chat tab: yields (chatbot, conversation, textbox, status). Errors become the
        status line; the conversation and what the user typed stay, so they can retry.
        `explain`: add a heatmap of where the model looked to the answer (apps/heatmap.py)."""
        conversation = list(conversation or [])
        history = [{"role": m["role"], "content": m["content"]} for m in conversation]
        files, text = chat_parts(message)
        replies = chat(message, history, model_name)
        try:
            first = next(replies, "")
        except gr.Error as e:
            yield gr.skip(), gr.skip(), gr.skip(), f"⚠ {e.message}"
            return
        uploads = [{"type": "file", "file": {"path": path}} for path in files]
        user = {"role": "user", "content": [*uploads, {"type": "text", "text": text}]}
        images = sum(_file_path(p) is not None for m in history + [user] for p in m["content"] if isinstance(p, dict))
        answer = {"role": "assistant", "content": first, "model": model_name, "images": images}
        conversation += [user, answer]
        yield shown(conversation), conversation, gr.MultimodalTextbox(value=None), ""
        try:
            for reply in replies:
                answer["content"] = reply
                yield shown(conversation), conversation, gr.skip(), ""
            if explain and images:
                answer["heatmap"], note = readable_errors(heatmap)(model_name, conversation)
                yield shown(conversation), conversation, gr.skip(), note
        except gr.Error as e:
            yield shown(conversation), conversation, gr.skip(), f"⚠ {e.message}"

    @readable_errors
    def caption(files: list, model_name: str, prompt: str, progress=None) -> tuple[list, list]:
        """Rows [file name, caption] and (picture, caption) thumbnails of the readable ones."""
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
        instruction = prompt or DEFAULT_CAPTION_PROMPT
        for start in range(0, len(pictures), CAPTION_BATCH):
            if progress is not None:
                progress((start, len(pictures)), desc="captioning", unit="images")
            batch = pictures[start : start + CAPTION_BATCH]
            captions = model.answer_batch(batch, [instruction] * len(batch), max_new_tokens=32)
            for slot, text in zip(slots[start:], captions):
                rows[slot][1] = text
        thumbnails = [(picture, rows[slot][0] + ": " + rows[slot][1]) for picture, slot in zip(pictures, slots)]
        return rows, thumbnails

    def caption_api(files: list, model_name: str, prompt: str):
        return caption(files, model_name, prompt)[0]

    def caption_page(files: list, model_name: str, prompt: str, progress=gr.Progress()):
        """The Caption tab: (table, thumbnails, CSV download, JSONL download, status)."""
        try:
            rows, thumbnails = caption(files, model_name, prompt, progress)
        except gr.Error as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠ {e.message}"
        csv_file, jsonl_file = _caption_files(rows)
        done = f"{len(thumbnails)} of {len(rows)} captioned by {model_name}."
        return rows, thumbnails, gr.DownloadButton(value=csv_file), gr.DownloadButton(value=jsonl_file), done

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
            clip_facts = ModelFacts("clip-easyvqa")
            if index is None and clip_facts.card:
                zeroshot = (clip_facts.card.get("test_metrics") or {}).get("zeroshot_top1")
                gr.Markdown(
                    "The demo index holds the 1,000 easy-VQA test pictures (64×64, one coloured shape each), "
                    "searched with clip-easyvqa, which knows 8 colours and 3 shapes"
                    + (f" (zero-shot accuracy {zeroshot:.1%} on easy-VQA test, from its card)." if zeroshot else "."),
                    elem_classes="panel",
                )
            with gr.Row():
                query = gr.Textbox(
                    label="Query",
                    placeholder='a red circle   ·   "red circle - triangle"   ·   "2:red + circle"',
                    scale=4,
                )
                k = gr.Slider(1, 50, value=12, step=1, label="Results", scale=1)
            gr.Markdown(QUERY_SYNTAX)
            query_image = UploadedImage(
                label="Find images like this one (optional)", type="filepath", image_mode=None, height=160
            )
            search_button = gr.Button("Search", variant="primary")
            search_status = gr.Markdown(elem_id="search-status")
            gallery = gr.Gallery(label="Results (score, path)", columns=6, height=520, elem_id="results")
            searched = gr.State({})
            with gr.Row():
                hit_map = gr.Image(
                    label="Where the clicked result matches the search",
                    type="filepath",
                    height=256,
                    width=256,
                    interactive=False,
                    elem_id="match-map",
                )
                hit_note = gr.Markdown("Click a result to see where it matches the search.", elem_id="match-note")
            query_examples = gr.Examples(
                ["a red circle", "a blue triangle", "green - circle", "2:yellow + rectangle"], [query], label="Try"
            )
            # Searches have their own concurrency group: they must not wait behind the
            # CONCURRENCY chat and caption requests, and the shared CLIP batches them.
            searching = {"concurrency_limit": SEARCH_CONCURRENCY, "concurrency_id": "search"}
            for trigger in (search_button.click, query.submit, query_examples.load_input_event.then):
                trigger(
                    search_page,
                    [query, query_image, k],
                    [gallery, search_status, searched, hit_map],
                    api_name=False,
                    **searching,
                ).then(None, js=SCROLL_RESULTS_TO_TOP)
            gallery.select(match_map, searched, [hit_map, hit_note], api_name=False, **searching)
            api_search = gr.Button(visible=False)
            api_search.click(search_api, [query, query_image, k], gallery, api_name="search", **searching)
        with gr.Tab("Chat"):
            model = gr.Dropdown(names, value=names[0] if names else None, label="Model")
            chat_panel = gr.Markdown(facts[names[0]].markdown() if names else "", elem_classes="panel")
            model.change(lambda name: facts[name].markdown(), model, chat_panel, api_name=False, queue=False)
            chatbot = gr.Chatbot(label="Conversation", height=640, elem_id="chatbot", layout="bubble")
            conversation = gr.State([])
            chat_status = gr.Markdown(elem_id="chat-status")
            textbox = gr.MultimodalTextbox(
                file_types=["image"],
                file_count="multiple",
                placeholder="Attach images and ask about them",
                show_label=False,
                elem_id="chat-input",
            )
            explain = gr.Checkbox(
                label="Show where the model looked (a heatmap over the latest picture, by occlusion)",
                elem_id="chat-explain",
            )
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                clear = gr.Button("Clear", elem_id="chat-clear")
            chat_examples = gr.Examples([[m] for m in example_messages()], [textbox], label="Examples (click one)")
            gr.Markdown(limits)
            turn = {"fn": chat_page, "inputs": [textbox, conversation, model, explain], "api_name": False}
            turn["outputs"] = [chatbot, conversation, textbox, chat_status]
            events = [
                send.click(**turn),
                textbox.submit(**turn),
                chat_examples.load_input_event.then(**turn),
            ]
            stop.click(None, cancels=events, api_name=False, queue=False).then(
                lambda: "Stopped.", None, chat_status, api_name=False, queue=False
            )  # after the cancel, so a late update of the stopped reply cannot overwrite it
            clear.click(
                lambda: ([], [], ""), None, [chatbot, conversation, chat_status], cancels=events, api_name=False
            )
            api_message = gr.MultimodalTextbox(visible=False)
            api_history = gr.JSON(value=[], visible=False)
            api_reply = gr.Textbox(visible=False)
            gr.Button(visible=False).click(chat_api, [api_message, model, api_history], api_reply, api_name="chat")
        with gr.Tab("Caption"):
            with gr.Row():
                caption_model = gr.Dropdown(names, value=names[0] if names else None, label="Model")
                caption_prompt = gr.Textbox(DEFAULT_CAPTION_PROMPT, label="Instruction")
            caption_panel = gr.Markdown(facts[names[0]].markdown() if names else "", elem_classes="panel")
            caption_model.change(lambda n: facts[n].markdown(), caption_model, caption_panel, api_name=False)
            files = gr.File(file_count="multiple", file_types=["image"], label="Images", elem_id="caption-files")
            caption_button = gr.Button("Caption", variant="primary")
            caption_status = gr.Markdown()
            with gr.Row():
                thumbnails = gr.Gallery(label="Pictures", columns=4, height=360, scale=1)
                table = gr.Dataframe(headers=["file", "caption"], label="Captions", wrap=True, scale=1)
            with gr.Row():
                csv_button = gr.DownloadButton("Download CSV", elem_id="download-csv")
                jsonl_button = gr.DownloadButton("Download JSONL", elem_id="download-jsonl")
            caption_button.click(
                caption_page,
                [files, caption_model, caption_prompt],
                [table, thumbnails, csv_button, jsonl_button, caption_status],
                api_name=False,
            )
            gr.Button(visible=False).click(
                caption_api, [files, caption_model, caption_prompt], table, api_name="caption"
            )
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
    precision: Precision = Precision(),
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

        with clip_precision(precision):
            search = SearchService(index=index or default_index())
        served = build_api(
            models=models,
            api_key=api_key,
            loopback_only=not remote,
            trust_remote_code=trust_remote_code,
            precision=precision,
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
        precision=precision,
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
            css=CSS,
            quiet=not block,
            app_kwargs={"middleware": [guard], "routes": routes},
        )
    except OSError as e:  # lost a race for the port since check_bind
        raise VlmError(f"cannot serve on {host}:{port} ({e})") from None
    return app
