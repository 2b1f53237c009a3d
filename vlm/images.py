"""The one image loader: any file or mode in, an RGB PIL image out, or an ImageError.

Every part of vlmstack (training, evaluation, indexing, captioning, the app) opens images
through `load_image`, and turns them into model input with `to_tensor`, so a picture looks
the same to every model whichever path it came by.

`to_tensor` reproduces Hugging Face's PIL-backend image processors pixel for pixel (so
pretrained checkpoints see the input they were trained on):
    crop=True                     CLIPImageProcessor (shorter side to size, centre crop)
    crop=False                    SiglipImageProcessor (straight to size x size)
    pad_to_square=True, crop=True LlavaImageProcessor(do_pad=True) (mean-colour square first)
"""

import contextlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm.errors import ImageError

# Refuse images above this many pixels before decoding them: a small file whose header
# claims 100k x 100k pixels would otherwise allocate tens of GB (a "decompression bomb").
MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Transparent pixels are composited onto white: what a viewer shows for a cut-out image.
_BACKGROUND = (255, 255, 255)

# A path, the file's bytes, a PIL image, or anything with read_bytes() (e.g. an image
# inside a webdataset shard, vlm.data.webdataset.TarMember).
ImageSource = Union[str, Path, bytes, Image.Image, object]


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image as RGB, with its EXIF orientation applied.

    Args:
        source: a file path, the file's bytes, a PIL image, or an object with read_bytes().
        max_pixels: refuse images with more pixels than this (checked before decoding).
    Returns:
        A fully decoded RGB PIL image.
    Raises:
        ImageError: the file is missing, empty, truncated, not an image, or too large.
    """
    name = "<image>" if isinstance(source, (bytes, Image.Image)) else str(source)
    if not isinstance(source, (str, Path, bytes, Image.Image)):
        try:
            source = source.read_bytes()
        except OSError as e:
            raise ImageError(f"{name}: cannot read ({e})") from None
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, Path)):
            source = stack.enter_context(_open_regular_file(source, name))
        return _decode(source, name, max_pixels)


@contextlib.contextmanager
def _open_regular_file(path: str | Path, name: str) -> Iterator[BinaryIO]:
    """The file at `path` opened for reading, refused unless it is a regular file: a FIFO
    put where an image was would block the read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror})") from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"{name}: not a regular file (a FIFO, socket or device)")
        yield f


def _decode(source, name: str, max_pixels: int) -> Image.Image:
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}")
        image.seek(0)  # first frame of an animated GIF/WebP
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or an empty file)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: cannot decode ({e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16/32-bit and float scaled to 8 bits, alpha over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        image = Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L")
        mode = "L"
    if mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit or float grayscale array to 0..255."""
    array = array.astype(np.float64)
    if mode == "F":
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
    elif mode.startswith("I;16") or array.max(initial=0) > 255:
        top = 65535.0  # 16-bit data, however PIL labelled it
    else:
        top = 255.0
    return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic, antialiased) and centre-crop a square.

    The longer side is truncated, int(size * long / short), not rounded: what CLIP's
    processor and torchvision's Resize (open_clip) do, so the crop lands on the same pixels.
    """
    width, height = image.size
    if (width, height) == (size, size):
        return image
    short, long = min(width, height), max(width, height)
    long = int(size * long / short)
    new_w, new_h = (size, long) if width <= height else (long, size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def expand_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Centre the image on a square of the mean colour, side = its longer side.

    As LLaVA's expand2square and transformers' LlavaImageProcessor(do_pad=True): colour
    int(m * 255) per channel (truncated), offset (side - short) // 2, so an odd spare
    pixel goes below / to the right.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def to_tensor(
    image: Image.Image,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop: bool = True,
    pad_to_square: bool = False,
) -> torch.Tensor:
    """RGB image -> normalised float tensor (3, size, size), the model's input.

    Args:
        image: an RGB PIL image (from `load_image`).
        size: the model's square input side in pixels.
        mean, std: per-channel normalisation of pixels scaled to 0..1.
        crop: True resizes the shorter side to `size` and centre-crops (CLIP); False
            resizes straight to size x size, not keeping the aspect ratio (SigLIP).
        pad_to_square: first pad to a square of the mean colour (LLaVA's do_pad), so
            nothing is cropped away.
    Returns:
        A float32 tensor (3, size, size).
    """
    if pad_to_square:
        image = expand_to_square(image, mean)
    if crop:
        image = resize_and_crop(image, size)
    elif image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (3, H, W)


@dataclass(frozen=True)
class ImageTransform:
    """A model's preprocessing as a small picklable object (for DataLoader workers)."""

    size: int  # square input side in pixels
    mean: tuple  # per-channel normalisation
    std: tuple
    crop: bool = True  # False: squash to size x size (SigLIP) instead of crop (CLIP)
    pad_to_square: bool = False  # True: mean-colour square before resizing (LLaVA do_pad)

    def __call__(self, source: ImageSource) -> torch.Tensor:
        """Any image source -> (3, size, size). Raises ImageError."""
        return to_tensor(
            load_image(source),
            size=self.size,
            mean=self.mean,
            std=self.std,
            crop=self.crop,
            pad_to_square=self.pad_to_square,
        )


def is_image_file(path: Union[str, Path]) -> bool:
    """True when the file name has one of the image extensions we index."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)
