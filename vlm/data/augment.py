"""Training augmentation that keeps captions true.

- formats: the same picture as users send it — re-encoded as JPEG or WebP, saved as RGBA
  or palette PNG, at another size (96-256 px).
- hflip: a mirror image (captions here say nothing about left and right).
- zoom_out: the picture shrunk onto a canvas of its own border colour at a random spot,
  making the small objects that are hardest to tell apart.

Nothing changes colours or cuts objects: no colour jitter, no crops, no vertical flips
(easy-VQA's triangles point up).
"""

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageOps

from vlm.images import load_image


@dataclass(frozen=True)
class AugmentConfig:
    formats: float = 0.5  # probability of a format/size round trip
    hflip: float = 0.5  # probability of a horizontal flip
    zoom_out: float = 0.0  # probability of shrinking onto a border-coloured canvas
    min_zoom: float = 0.75  # smallest scale zoom_out uses
    min_size: int = 96  # format round trips resize to a side in [min_size, max_size]
    max_size: int = 256
    min_quality: int = 60  # JPEG/WebP quality range
    max_quality: int = 95


@dataclass(frozen=True)
class Augment:
    """A picklable callable PIL -> PIL applying `config` (for DataLoader workers)."""

    config: AugmentConfig

    def __call__(self, image: Image.Image) -> Image.Image:
        config = self.config
        if random.random() < config.hflip:
            image = ImageOps.mirror(image)
        if random.random() < config.zoom_out:
            image = _zoom_out(image, random.uniform(config.min_zoom, 1.0))
        if random.random() < config.formats:
            image = _round_trip(image, config)
        return image


def _zoom_out(image: Image.Image, scale: float) -> Image.Image:
    width, height = image.size
    small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", image.size, image.getpixel((0, 0)))
    canvas.paste(small, (random.randint(0, width - small.width), random.randint(0, height - small.height)))
    return canvas


def _round_trip(image: Image.Image, config: AugmentConfig) -> Image.Image:
    side = random.randint(config.min_size, config.max_size)
    image = image.resize((side, side), Image.BICUBIC)
    fmt = random.choice(["JPEG", "WEBP", "PNG-RGBA", "PNG-P"])
    buffer = io.BytesIO()
    if fmt == "PNG-RGBA":
        image.convert("RGBA").save(buffer, "PNG")
    elif fmt == "PNG-P":
        image.convert("P", palette=Image.ADAPTIVE, colors=256).save(buffer, "PNG")
    else:
        image.save(buffer, fmt, quality=random.randint(config.min_quality, config.max_quality))
    return load_image(buffer.getvalue())
