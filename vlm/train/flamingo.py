"""Recipe: train a Flamingo-style model, as phases of a pipeline (vlm/train/recipes.py,
run by vlm/train/pipeline.py).

    vlmstack train flamingo --recipe flamingo-easyvqa --out runs/flamingo

The first phase builds a new model (or starts from `init`); every later one continues the
phase before it, with its own data and training settings.

The vision tower and the language model stay frozen; the Perceiver Resampler, the gated
cross-attention blocks and the embeddings of the new tokens (<image>, <|endofchunk|>)
learn. Data: a split's conversations (questions and captions), few-shot interleaved
sequences and two-image comparisons (built-in easy-VQA), or a LLaVA JSON file.
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from vlm import hub
from vlm.clip import load_clip
from vlm.data import easyvqa
from vlm.data.augment import Augment, AugmentConfig
from vlm.data.interleaved import fewshot_records, pair_records
from vlm.data.mix import EasyVqaMix
from vlm.data.sequences import record_images
from vlm.data.sources import builtin_split, conversation_records
from vlm.errors import VlmError
from vlm.flamingo import FlamingoArchitecture, FlamingoModel, build_flamingo
from vlm.lm import load_lm
from vlm.train.splits import held_out
from vlm.train.trainer import TrainConfig
from vlm.train.vlm_stage import train_stage
from vlm.vision import VisionTower

log = logging.getLogger(__name__)


@dataclass
class FlamingoRecipe:
    vision: str = "clip-easyvqa"  # any CLIP load_clip accepts, with a ViT image tower
    vision_layer: int = -2  # transformer block whose patch tokens feed the resampler
    lm: str = "lm-easyvqa"  # any causal LM load_lm accepts (frozen), or "phase:NAME" (an lm_recipe phase's)
    model: FlamingoArchitecture = field(default_factory=FlamingoArchitecture)  # resampler, cross-attention, max_length
    init: str | None = None  # the first phase continues this Flamingo model (shipped name or directory)
    data: str = "easyvqa:train"  # built-in split or LLaVA JSON file
    mix: EasyVqaMix = field(
        default_factory=lambda: EasyVqaMix(fewshot_sequences=8000, pair_questions=8000)
    )  # built-in data only
    val_fraction: float = 0.02  # images held out for validation
    augment: AugmentConfig | None = None  # training-image augmentation (vlm/data/augment.py); None = none
    train: TrainConfig = field(default_factory=TrainConfig)
    model_fields: ClassVar = frozenset({"vision", "vision_layer", "lm", "model", "init"})  # set once per pipeline


def freeze_for_flamingo(model: FlamingoModel) -> None:
    """Only the resampler, the cross-attention blocks and the new tokens' embedding rows
    learn. The embedding matrix stays one parameter; a gradient hook zeroes every other
    row (and embeddings get no weight decay, so those rows never move)."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("resampler.") or ".xattn." in name
    embeddings = model.lm.get_input_embeddings().weight
    embeddings.requires_grad = True
    rows = torch.zeros(embeddings.shape[0], 1)
    rows[[model.image_token_id, model.chunk_end_id]] = 1
    embeddings.register_hook(lambda grad: grad * rows)


def training_records(recipe: FlamingoRecipe) -> list[dict]:
    mix = recipe.mix
    records = conversation_records(recipe.data, mix=mix)
    split = builtin_split(recipe.data)
    if split:
        records += fewshot_records(easyvqa.vqa_records(split), mix.fewshot_sequences, seed=1)
        records += pair_records(
            list(easyvqa.images(split)), mix.pair_questions, recall=mix.recall_questions, skew=mix.yes_no_skew, seed=2
        )
    return records


def train_flamingo(
    recipe: FlamingoRecipe,
    out: str | Path,
    *,
    resume: bool = False,
    start: Path | None = None,
    card: dict | None = None,
) -> dict:
    """Train one phase into `out`, from the model in `start` (the previous phase's) or else
    `recipe.init` or else a new model; returns the validation metrics.
    `card` adds fields to the model card (a pipeline's: phase, recipe, commit), written
    with the rest in one write."""
    torch.manual_seed(recipe.train.seed)
    model = _load(str(start or recipe.init)) if start or recipe.init else _new_model(recipe)
    freeze_for_flamingo(model)
    records = training_records(recipe)
    # A sequence is validation if any of its images is held out; training never sees them.
    val = [r for r in records if any(held_out(p, recipe.val_fraction) for p in record_images(r))]
    train = [r for r in records if not any(held_out(p, recipe.val_fraction) for p in record_images(r))]
    card = {"kind": "flamingo", "resolved_recipe": asdict(recipe), **(card or {})}
    augment = Augment(recipe.augment) if recipe.augment else None
    return train_stage(
        model,
        records=train,
        val_records=val,
        config=recipe.train,
        run_dir=Path(out),
        resume=resume,
        card=card,
        augment=augment,
    )


def _new_model(recipe: FlamingoRecipe) -> FlamingoModel:
    vision = VisionTower.from_clip(load_clip(recipe.vision), layer=recipe.vision_layer)
    lm, tokenizer = load_lm(recipe.lm)
    return build_flamingo(
        vision=vision,
        lm=lm,
        tokenizer=tokenizer,
        **vars(recipe.model),
    )


def _load(source: str) -> FlamingoModel:
    directory = hub.resolve_dir(source)
    if directory is None or hub.model_kind(directory) != "flamingo":
        raise VlmError(f"{source!r} is not a shipped Flamingo model or a Flamingo model directory")
    return FlamingoModel.load(directory)
