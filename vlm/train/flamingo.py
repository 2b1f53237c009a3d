"""Recipe: train a Flamingo-style model.

    vlmstack train flamingo --recipe flamingo-easyvqa --out runs/flamingo
    vlmstack train flamingo --recipe R --out runs/more --init flamingo-easyvqa  # continue a model

The vision tower and the language model stay frozen; the Perceiver Resampler, the gated
cross-attention blocks and the embeddings of the new tokens (<image>, <|endofchunk|>)
learn. Data: a split's conversations (questions and captions), few-shot interleaved
sequences and two-image comparisons (built-in easy-VQA), or a LLaVA JSON file.
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
from vlm.schema import schema_field
from vlm.train.recipes import load_recipe
from vlm.train.splits import held_out
from vlm.train.trainer import TrainConfig
from vlm.train.vlm_stage import train_stage
from vlm.vision import VisionTower

log = logging.getLogger(__name__)


@dataclass
class FlamingoRecipe:
    vision: str = "clip-easyvqa"  # any CLIP load_clip accepts, with a ViT image tower
    vision_layer: int = -2  # transformer block whose patch tokens feed the resampler
    lm: str = "lm-easyvqa"  # any causal LM load_lm accepts (frozen)
    model: FlamingoArchitecture = field(default_factory=FlamingoArchitecture)  # resampler, cross-attention, max_length
    data: str = "easyvqa:train"  # built-in split or LLaVA JSON file
    mix: EasyVqaMix = field(
        default_factory=lambda: EasyVqaMix(fewshot_sequences=8000, pair_questions=8000)
    )  # built-in data only
    val_fraction: float = 0.02  # images held out for validation
    augment: AugmentConfig | None = None  # training-image augmentation (vlm/data/augment.py); None = none
    train: TrainConfig = field(default_factory=TrainConfig)
    schema_version: int = schema_field()


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


def train_flamingo(recipe_spec: str, out: str | Path, *, resume: bool = False, init: str | None = None) -> dict:
    """Train a new model, or with `init` (shipped name or model directory) continue one:
    then the recipe's data and training settings apply and its architecture fields do not."""
    recipe, recipe_json = load_recipe(FlamingoRecipe, recipe_spec, "flamingo")
    torch.manual_seed(recipe.train.seed)
    model = _init_model(init) if init else _new_model(recipe)
    freeze_for_flamingo(model)
    records = training_records(recipe)
    # A sequence is validation if any of its images is held out; training never sees them.
    val = [r for r in records if any(held_out(p, recipe.val_fraction) for p in record_images(r))]
    train = [r for r in records if not any(held_out(p, recipe.val_fraction) for p in record_images(r))]
    card = {"kind": "flamingo", "recipe": recipe_json, "resolved_recipe": asdict(recipe)}
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


def _init_model(init: str) -> FlamingoModel:
    directory = hub.resolve_dir(init)
    if directory is None or hub.model_kind(directory) != "flamingo":
        raise VlmError(f"--init {init!r} is not a shipped Flamingo model or a Flamingo model directory")
    return FlamingoModel.load(directory)
