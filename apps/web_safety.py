"""What the web app does so that callers it cannot trust get only what the page offers.

- Files: a request reads only files that were uploaded to this app (regular files inside
  Gradio's upload folder), never a path it names; images per message and decoded pixels
  per request are capped.
- Requests: the Host header must name the address the app serves (no DNS rebinding of a
  loopback app), and a browser request that changes something must come from the app's
  own page (a foreign Origin is refused, so another site cannot post to it).
- Errors: shown as one line without server paths (only a file's own name); anything
  unexpected becomes a short note and a log entry, never a traceback.
- Binding: the real cause in one line (unknown host, not this machine's address, port in
  use) before Gradio starts.
"""

import errno
import functools
import inspect
import logging
import re
import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse

from vlm.errors import ImageError, VlmError
from vlm.images import load_image

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# "/tmp/gradio/3f2a/photo.png: not an image" -> "photo.png: not an image"
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])(?:/[^/\s:'\"(),]+)+/([^/\s:'\"(),]+)")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def public_message(text: str) -> str:
    """`text` with every absolute path cut to its last part: web users see no server paths."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def readable_errors(fn):
    """Show user errors as their message (no server paths) and anything else as a short
    note, never a traceback. Works for plain and generator functions."""

    def convert(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return gr.Error(public_message(e.message))
        if isinstance(e, (VlmError, ValueError)):
            return gr.Error(public_message(str(e)))
        log.exception("request failed")
        return gr.Error(f"Something went wrong ({type(e).__name__}). The server log has the details.")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise convert(e) from None

    @functools.wraps(fn)
    def generator_wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except Exception as e:
            raise convert(e) from None

    return generator_wrapper if inspect.isgeneratorfunction(fn) else wrapper


def uploaded_file(path: str | Path) -> Path:
    """`path` if it is a regular file that was uploaded to this app.

    Raises:
        gr.Error: the path is outside Gradio's upload folder (a caller named a server
            file), or not a regular file there (gone, or a FIFO that would block).
    """
    name = Path(str(path)).name
    try:
        resolved = Path(path).resolve(strict=True)
        inside = resolved.is_relative_to(Path(get_upload_folder()).resolve())
        regular = stat.S_ISREG(resolved.stat().st_mode)
    except (OSError, RuntimeError, ValueError):
        inside = regular = False
    if not inside:
        raise gr.Error(f"{name}: not a file uploaded to this app (attach it to the message)")
    if not regular:
        raise gr.Error(f"{name}: not a regular file")
    return resolved


def header_pixels(file: Path) -> int:
    """Pixels of an image file, read from its header without decoding it. Raises ImageError."""
    try:
        with Image.open(file) as image:
            return image.width * image.height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ImageError(f"{file.name}: not an image (or an empty file)") from None


def load_uploads(paths: list[str], *, max_images: int, max_pixels: int) -> list[Image.Image]:
    """Decode uploaded images, refusing more than `max_images` or `max_pixels` in all
    (checked from the headers, before any image is decoded).

    Raises:
        gr.Error: too many images or pixels, a file that is not an upload, or not an image.
    """
    if len(paths) > max_images:
        raise gr.Error(f"{len(paths)} images: at most {max_images} per request")
    files = [uploaded_file(path) for path in paths]
    try:
        total = sum(header_pixels(file) for file in files)
        if total > max_pixels:
            raise gr.Error(f"the images hold {total / 1e6:.1f} megapixels; at most {max_pixels / 1e6:.0f} per request")
        return [load_image(file, max_pixels=max_pixels) for file in files]
    except ImageError as e:
        raise gr.Error(public_message(str(e))) from None


class UploadedImage(gr.Image):
    """gr.Image that reads only uploaded files: Gradio opens an image payload's `path`
    as given when the payload carries no file metadata, which would let a caller search
    by any file on the server (or block a worker on a FIFO)."""

    is_template = True  # rendered by the front end as a plain Image

    def preprocess(self, payload):
        if payload is not None:
            if payload.url and payload.url.startswith("data:"):
                raise gr.Error("send the image as an uploaded file, not a data: URL")
            uploaded_file(payload.path or "")
        return super().preprocess(payload)


def _hostname(netloc: str) -> str:
    """ "127.0.0.1:7860" -> "127.0.0.1", "[::1]:7860" -> "::1"."""
    return urlsplit(f"//{netloc}").hostname or ""


class SameOriginOnly:
    """ASGI middleware: refuse requests whose Host is not one of `hosts` (None: any), and
    requests that change something sent by a page of another origin."""

    def __init__(self, app, *, hosts: tuple[str, ...] | None):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            if self.hosts is not None and _hostname(host) not in self.hosts:
                return await PlainTextResponse("unexpected Host header", status_code=403)(scope, receive, send)
            origin = headers.get("origin")
            changes = scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS
            if origin and changes and urlsplit(origin).netloc != host:
                return await PlainTextResponse("cross-origin request refused", status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


def check_bind(host: str, port: int) -> None:
    """Raises VlmError with the real reason when `host`:`port` cannot be served."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise VlmError(f"--host {host}: not a known host name or address") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise VlmError(f"port {port} is in use on {host}; choose another --port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise VlmError(
                    f"--host {host} is not an address of this machine; use 127.0.0.1, or 0.0.0.0 for every address"
                ) from None
            if e.errno == errno.EACCES:
                raise VlmError(f"port {port} needs administrator rights; choose a --port of 1024 or more") from None
            raise VlmError(f"cannot serve on {host}:{port} ({e.strerror})") from None
