"""Recipe: train a CLIP contrastively on image-caption pairs.

    vlmstack train clip --recipe clip-easyvqa --out runs/clip

(Recipes are pipelines of phases, run by vlm/train/pipeline.py; `train_clip` is one phase.)

Identical captions in a batch are one text with several positive images (vlm/losses.py),
never negatives of each other; under torchrun the batch is gathered from all ranks. The run directory ends up a loadable model directory.
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from vlm import hub
from vlm.clip import build_clip, load_clip
from vlm.data.augment import Augment, AugmentConfig
from vlm.data.image_text import CollateImageText, ImageTextDataset
from vlm.data.sources import caption_records
from vlm.errors import VlmError
from vlm.eval.clip import evaluate_clip
from vlm.train import distributed
from vlm.train.objectives import ContrastiveLoss
from vlm.train.splits import split_by_image
from vlm.train.trainer import TrainConfig, Trainer, param_groups

log = logging.getLogger(__name__)
LOSSES = ("clip", "siglip")


@dataclass
class ClipRecipe:
    arch: str = "clip-tiny"  # preset (vlm/configs/) or open_clip architecture name
    init: str | None = None  # start from these weights (anything load_clip accepts) instead of random
    data: str = "easyvqa:train"  # caption pairs: built-in name or .jsonl/.csv
    val_fraction: float = 0.05  # share of the training images held out for validation curves
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip" (pairwise sigmoid)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None = no augmentation
    train: TrainConfig = field(default_factory=TrainConfig)
    model_fields: ClassVar = frozenset({"arch", "init"})  # build the model: set once per pipeline

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise VlmError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if not 0 <= self.val_fraction < 1:
            raise VlmError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def train_clip(
    recipe: ClipRecipe, out: str | Path, *, resume: bool = False, start: Path | None = None, card: dict | None = None
) -> dict:
    """Train one phase into `out`, from the model in `start` (the previous phase's) or else
    `recipe.init` or else new weights; returns the final validation metrics.
    `card` adds fields to the model card (a pipeline's: phase, recipe, commit), written
    with the rest in one write."""
    out = Path(out)
    torch.manual_seed(recipe.train.seed)
    if start or recipe.init:
        clip = load_clip(str(start or recipe.init))
    else:
        clip = build_clip(recipe.arch)
        if recipe.loss == "siglip":  # SigLIP's initialisation: t = 10, b = -10
            clip.config.model_cfg.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
            clip = type(clip)(config=clip.config)
    train_records, val_records = split_by_image(
        caption_records(recipe.data), recipe.val_fraction, image=lambda r: r.image
    )
    log.info("%d training pairs, %d held out for validation", len(train_records), len(val_records))

    augment = Augment(recipe.augment) if recipe.augment else None
    dataset = ImageTextDataset(train_records, transform=clip.transform, augment=augment)
    model = clip.model

    def clamp_temperature() -> None:
        with torch.no_grad():  # CLIP caps the logit scale at 100
            model.logit_scale.clamp_(0, math.log(100))

    trainer = Trainer(
        model=model,
        groups=param_groups(model, recipe.train.weight_decay),
        config=recipe.train,
        run_dir=out,
        dataset=dataset,
        collate=CollateImageText(clip.tokenizer),
        objective=ContrastiveLoss(clip, loss=recipe.loss),
        evaluate=(lambda: evaluate_clip(clip, val_records, progress=False)) if val_records else None,
        after_step=clamp_temperature,
    )
    started = time.time()
    metrics = trainer.fit(resume=resume)
    if not distributed.is_main():
        return metrics
    clip.save(out)
    hub.write_run_card(
        out,
        model=clip,
        train_seconds=trainer.train_seconds,
        validation=metrics,
        kind="clip",
        resolved_recipe=asdict(recipe),
        wall_seconds_this_run=round(time.time() - started, 1),
        skipped_images=trainer.skipped,
        **(card or {}),
    )
    return metrics
