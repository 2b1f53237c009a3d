"""What `vlmstack serve` accepts: OpenAI's request schemas, and the images inside them.

Requests are pydantic models (unknown fields are ignored, as OpenAI-compatible servers
do: clients send fields like `presence_penalty` that we have no use for). Images arrive
as URLs: base64 `data:` URLs of PNG, JPEG or WebP, or http(s) URLs that are fetched only
with --allow-remote-images (with a size cap, a timeout, no redirects, and never from an
address of this machine or its private network). No request ever names a file to open.

Images per request and decoded pixels per request are capped; the pixel count is read
from the image headers before anything is decoded.
"""

import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from apps.server_errors import ApiError
from vlm.cli import MAX_NEW_TOKENS
from vlm.errors import ImageError
from vlm.images import load_image
from vlm.lm import IMAGE_TOKEN

MAX_IMAGES = 16  # images per request, all messages (as the app)
MAX_REQUEST_PIXELS = 32_000_000  # decoded pixels per request, all images together
MAX_IMAGE_BYTES = 10_000_000  # a fetched remote image
REMOTE_TIMEOUT = 10.0  # seconds to fetch a remote image
MAX_MESSAGES = 256
MAX_EMBEDDING_INPUTS = 256
MAX_TEXT_CHARS = 100_000  # per text part or embedding input
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageUrl(BaseModel):
    url: str = Field(max_length=30_000_000)
    detail: str | None = None  # OpenAI's resolution hint; our models see one size


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = Field(default=None)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)  # OpenAI's newer name
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0 = greedy (OpenAI's default is 1)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: give at most 4 non-empty strings", param="stop")
        return tuple(stops)


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[Any]  # texts; {"image": URL} items are our extension (parse_embedding_inputs)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class SearchRequest(BaseModel):
    query: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    image: str | None = None  # a data: URL (or http(s) with --allow-remote-images)
    k: int = Field(default=10, ge=1, le=100)


async def parse_body(request: Request, schema: type[BaseModel]):
    """The body as `schema`, read as JSON whatever its Content-Type says (curl -d sends
    form-encoded). Raises RequestValidationError (the error handlers make it OpenAI-shaped)."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def chat_turns(messages: list[Message]) -> tuple[list[tuple[str, str]], list[str]]:
    """OpenAI messages -> (role, text) turns with one <image> marker per image, and the
    image URLs in order.

    A user message's images come first, each marker on its own line, then its text: the
    layout the models learnt ("<image>\\nwhat colour is the shape?"). System and developer
    messages are put in front of the next user message; consecutive messages of one role
    are joined. Raises ApiError: literal <image> text, or a conversation that does not end
    with a user message.
    """
    turns: list[tuple[str, str]] = []
    urls: list[str] = []
    preamble: list[str] = []
    for number, message in enumerate(messages):
        content = (
            message.content
            if isinstance(message.content, list)
            else [TextPart(type="text", text=message.content or "")]
        )
        texts = [part.text for part in content if isinstance(part, TextPart)]
        images = [part.image_url.url for part in content if isinstance(part, ImagePart)]
        if any(IMAGE_TOKEN in text for text in texts):
            raise ApiError(
                400, f"text may not contain {IMAGE_TOKEN}: send images as image_url parts", param=f"messages.{number}"
            )
        if images and message.role != "user":
            raise ApiError(400, "only user messages can carry images", param=f"messages.{number}")
        text = "\n".join(t for t in texts if t)
        if message.role in ("system", "developer"):
            preamble.append(text)
            continue
        if message.role == "user":
            text = "".join(f"{IMAGE_TOKEN}\n" for _ in images) + "\n\n".join([*preamble, text]).strip()
            urls.extend(images)
            preamble = []
        if turns and turns[-1][0] == message.role:
            turns[-1] = (message.role, f"{turns[-1][1]}\n{text}")
        else:
            turns.append((message.role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message", param="messages")
    return turns, urls


def parse_embedding_inputs(raw: str | list) -> list[str | dict]:
    """`input` -> texts (str) and images ({"image": URL}) in order.

    Extension: an item {"image": "data:image/png;base64,..."} is embedded as an image.
    Raises ApiError: empty input, token-id arrays, anything else.
    """
    items = [raw] if isinstance(raw, str) else raw
    if not items:
        raise ApiError(400, "input is empty: give a string or a list of strings", param="input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"{len(items)} inputs: at most {MAX_EMBEDDING_INPUTS} per request", param="input")
    for number, item in enumerate(items):
        param = f"input.{number}" if not isinstance(raw, str) else "input"
        if isinstance(item, str):
            if not item or len(item) > MAX_TEXT_CHARS:
                raise ApiError(400, f"texts must have 1 to {MAX_TEXT_CHARS:,} characters", param=param)
        elif isinstance(item, dict) and set(item) == {"image"} and isinstance(item["image"], str):
            pass
        elif isinstance(item, (int, list)):
            raise ApiError(400, "token-id inputs are not supported: send text", param=param)
        else:
            raise ApiError(400, 'each input is a string, or {"image": "data:image/...;base64,..."}', param=param)
    return items


@dataclass(frozen=True)
class ImagePolicy:
    """Where request images may come from and how big they may be."""

    allow_remote: bool = False  # fetch http(s) URLs (--allow-remote-images)
    max_images: int = MAX_IMAGES
    max_pixels: int = MAX_REQUEST_PIXELS
    max_bytes: int = MAX_IMAGE_BYTES
    timeout: float = REMOTE_TIMEOUT

    def load(self, urls: list[str], *, param: str = "messages") -> list[Image.Image]:
        """Decoded RGB images, refused (ApiError 400) when there are too many, when their
        headers add up to too many pixels, or when one is not a usable image. Blocking."""
        if len(urls) > self.max_images:
            raise ApiError(400, f"{len(urls)} images: at most {self.max_images} per request", param=param)
        blobs = [self.image_bytes(url, param=param) for url in urls]
        total = sum(_header_pixels(blob, param) for blob in blobs)
        if total > self.max_pixels:
            raise ApiError(
                400,
                f"the images hold {total / 1e6:.1f} megapixels; at most {self.max_pixels / 1e6:.0f} per request",
                param=param,
            )
        try:
            return [load_image(blob, max_pixels=self.max_pixels) for blob in blobs]
        except ImageError as e:
            raise ApiError(400, str(e), param=param) from None

    def image_bytes(self, url: str, *, param: str) -> bytes:
        if url.startswith("data:"):
            return _data_url_bytes(url, param)
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ApiError(400, "an image URL must be a data: URL (data:image/png;base64,...)", param=param)
        if not self.allow_remote:
            raise ApiError(
                400,
                "http(s) image URLs are off on this server: send a data: URL (or start it with --allow-remote-images)",
                param=param,
            )
        return self._fetch(url, param)

    def _fetch(self, url: str, param: str) -> bytes:
        import httpx

        _check_public_host(url, param)
        try:
            with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
                with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise ApiError(400, f"fetching the image URL gave HTTP {response.status_code}", param=param)
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > self.max_bytes:
                            raise ApiError(400, f"the image URL holds over {self.max_bytes:,} bytes", param=param)
                    return bytes(body)
        except httpx.HTTPError as e:
            raise ApiError(400, f"cannot fetch the image URL ({type(e).__name__})", param=param) from None


def _data_url_bytes(url: str, param: str) -> bytes:
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, "malformed data URL: expected data:image/png;base64,<base64 data>", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "malformed data URL: its data is not valid base64", param=param) from None


def _header_pixels(blob: bytes, param: str) -> int:
    """Pixels an image claims in its header, read without decoding it."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            if image.format not in IMAGE_FORMATS:
                raise ApiError(400, f"{image.format} images are not accepted: send PNG, JPEG or WebP", param=param)
            return image.width * image.height
    except ApiError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ApiError(400, "the image data is not a PNG, JPEG or WebP image", param=param) from None


def _check_public_host(url: str, param: str) -> None:
    """Refuse URLs whose host resolves to this machine or a private network: a caller must
    not reach, through us, what only the server can reach."""
    host = urlsplit(url).hostname
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else set()
    except (socket.gaierror, UnicodeError):
        addresses = set()
    if not addresses:
        raise ApiError(400, "the image URL's host does not resolve", param=param)
    if not all(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        raise ApiError(400, "the image URL points at a private or local address", param=param)
