"""Recipe: train a LLaVA-style model in LLaVA-1.5's two stages, as phases of a pipeline
(vlm/train/recipes.py, run by vlm/train/pipeline.py).

    vlmstack train llava --recipe llava-easyvqa --out runs/llava                 # every phase
    vlmstack train llava --recipe llava-easyvqa --out runs/llava --phase stage1  # one phase

A phase of `"stage": 1` aligns: only the projector trains, on image-caption exchanges,
with the vision tower and the LM frozen. A phase of `"stage": 2` instruction-tunes
projector and LM on conversations; the vision tower stays frozen. The first phase builds a
new model (or starts from `init`); every later one continues the phase before it.
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from vlm.clip import load_clip
from vlm.data.mix import EasyVqaMix
from vlm.data.sources import conversation_records
from vlm.errors import VlmError
from vlm.hub import model_kind, resolve_dir
from vlm.llava import LlavaArchitecture, LlavaModel, build_llava
from vlm.lm import load_lm
from vlm.train.splits import split_by_image
from vlm.train.trainer import TrainConfig
from vlm.train.vlm_stage import train_stage
from vlm.vision import VisionTower

log = logging.getLogger(__name__)
STAGES = (1, 2)


@dataclass
class LlavaRecipe:
    vision: str = "clip-easyvqa"  # any CLIP load_clip accepts, with a ViT image tower
    vision_layer: int = -2  # transformer block whose patch tokens are used (-2 = penultimate)
    lm: str = "lm-easyvqa"  # any causal LM load_lm accepts, or "phase:NAME" (an lm_recipe phase's)
    model: LlavaArchitecture = field(default_factory=LlavaArchitecture)  # projector, max_length
    init: str | None = None  # the first phase continues this LLaVA model (shipped name or directory)
    stage: int = 2  # 1: captions, projector only; 2: conversations, projector + LM
    data: str = "easyvqa:train"  # built-in split, caption file (stage 1) or LLaVA JSON (stage 2)
    mix: EasyVqaMix = field(default_factory=EasyVqaMix)  # stage 2, built-in data: yes/no and recall questions added
    val_fraction: float = 0.02  # images held out of the training data for validation loss
    train: TrainConfig = field(default_factory=TrainConfig)
    model_fields: ClassVar = frozenset({"vision", "vision_layer", "lm", "model", "init"})  # set once per pipeline

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")


def train_llava(
    recipe: LlavaRecipe, out: str | Path, *, resume: bool = False, start: Path | None = None, card: dict | None = None
) -> dict:
    """Train one phase into `out`, from the model in `start` (the previous phase's) or else
    `recipe.init` or else a new model; returns the validation metrics.
    `card` adds fields to the model card (a pipeline's: phase, recipe, commit), written
    with the rest in one write."""
    if start or recipe.init:
        model = _load(str(start or recipe.init))
    else:
        torch.manual_seed(recipe.train.seed)  # the projector's initialisation
        vision = VisionTower.from_clip(load_clip(recipe.vision), layer=recipe.vision_layer)
        lm, tokenizer = load_lm(recipe.lm)
        model = build_llava(vision=vision, lm=lm, tokenizer=tokenizer, **vars(recipe.model))
    freeze_for_stage(model, recipe.stage)
    kind = "captions" if recipe.stage == 1 else "conversations"
    records = conversation_records(recipe.data, kind=kind, mix=recipe.mix)
    train_records, val_records = split_by_image(records, recipe.val_fraction)
    return train_stage(
        model,
        records=train_records,
        val_records=val_records,
        config=recipe.train,
        run_dir=Path(out),
        resume=resume,
        card={"kind": "llava", "stage": recipe.stage, "resolved_recipe": asdict(recipe), **(card or {})},
    )


def _load(source: str) -> LlavaModel:
    directory = resolve_dir(source)
    if directory is None or model_kind(directory) != "llava":
        raise VlmError(f"{source!r} is not a shipped LLaVA model or a LLaVA model directory")
    return LlavaModel.load(directory)


def freeze_for_stage(model: LlavaModel, stage: int) -> None:
    """Stage 1: only the projector learns. Stage 2: projector and LM. Never the vision tower."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("projector.") or (stage == 2 and name.startswith("lm."))
