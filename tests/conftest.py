"""Shared fixtures: small synthetic image datasets and tiny random models (no downloads)."""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import COLORS, draw_shape

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


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


@pytest.fixture(scope="session")
def tiny_lm_and_tokenizer():
    """A 2-layer Llama-style LM and a BPE tokenizer trained on a few chat lines."""
    from vlm.lm import TinyLmConfig, build_tiny_lm, train_tokenizer

    corpus = [f"USER: what color is the {s}?\nASSISTANT: {c}" for s in ("circle", "rectangle", "shape") for c in COLORS]
    tokenizer = train_tokenizer(corpus * 20, 400)
    torch.manual_seed(0)
    config = TinyLmConfig(hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128)
    return build_tiny_lm(config, tokenizer), tokenizer


@pytest.fixture
def tiny_llava(tiny_clip, tiny_lm_and_tokenizer):
    import copy

    from vlm.llava import build_llava
    from vlm.vision import VisionTower

    lm, tokenizer = tiny_lm_and_tokenizer
    torch.manual_seed(0)
    return build_llava(
        vision=VisionTower.from_clip(tiny_clip),
        lm=copy.deepcopy(lm),
        tokenizer=copy.deepcopy(tokenizer),
        max_length=128,
    ).eval()


@pytest.fixture
def tiny_flamingo(tiny_clip, tiny_lm_and_tokenizer):
    import copy

    from vlm.flamingo import build_flamingo
    from vlm.resampler import ResamplerConfig
    from vlm.vision import VisionTower

    lm, tokenizer = tiny_lm_and_tokenizer
    torch.manual_seed(0)
    resampler = ResamplerConfig(depth=1, heads=2, head_dim=32, num_latents=8, max_frames=2)
    return build_flamingo(
        vision=VisionTower.from_clip(tiny_clip),
        lm=copy.deepcopy(lm),
        tokenizer=copy.deepcopy(tokenizer),
        resampler=resampler,
        xattn_heads=2,
        xattn_head_dim=32,
        max_length=128,
    ).eval()


@pytest.fixture
def pretrained_dirs(tmp_path, tiny_clip, tiny_lm_and_tokenizer) -> tuple[str, str]:
    """tiny_clip and the tiny LM with its tokenizer saved as model directories: the vision
    and lm a recipe names."""
    lm, tokenizer = tiny_lm_and_tokenizer
    tiny_clip.save(tmp_path / "clip")
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    return str(tmp_path / "clip"), str(tmp_path / "lm")


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_clip, tmp_path_factory) -> str:
    """tiny_clip saved as a model directory (for code that loads a model by name)."""
    path = tmp_path_factory.mktemp("model") / "clip"
    tiny_clip.save(path)
    return str(path)


@pytest.fixture
def tiny_llava_dir(tiny_llava, tmp_path) -> str:
    tiny_llava.save(tmp_path / "llava")
    return str(tmp_path / "llava")


@pytest.fixture
def folder(tmp_path):
    """Four shape pictures, two in a subfolder: a small folder to index."""
    root = tmp_path / "pictures"
    (root / "sub").mkdir(parents=True)
    for i, (color, shape) in enumerate(
        [("red", "circle"), ("blue", "rectangle"), ("green", "circle"), ("red", "rectangle")]
    ):
        draw_shape(color, shape, offset=i).save(root / ("sub" if i % 2 else ".") / f"{color}-{shape}.png")
    return root
