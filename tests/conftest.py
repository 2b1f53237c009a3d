"""Shared fixtures: small synthetic image datasets and tiny random models (no downloads)."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}


def draw_shape(color: str, shape: str, size: int = 64, offset: int = 0) -> Image.Image:
    """A white image with one coloured circle or rectangle."""
    image = Image.new("RGB", (size, size), (250, 245, 240))
    draw = ImageDraw.Draw(image)
    box = (12 + offset, 12 + offset, 44 + offset, 44 + offset)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    """A captions.jsonl with 48 images: 3 colours x 2 shapes x 8 positions, in a subfolder."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for color in COLORS:
        for shape in ("circle", "rectangle"):
            for offset in range(8):
                name = f"{color}-{shape}-{offset}.png"
                draw_shape(color, shape, offset=offset).save(folder / name)
                rows.append({"image": f"images/{name}", "caption": f"a {color} {shape}"})
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_clip():
    from vlm.clip import build_clip

    torch.manual_seed(0)
    return build_clip("clip-tiny").eval()
