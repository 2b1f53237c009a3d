"""Recipe: train a LLaVA-style model in LLaVA-1.5's two stages.

    vlmstack train llava --recipe llava-easyvqa --out runs/llava             # both stages
    vlmstack train llava --recipe llava-easyvqa --out runs/llava --stage 1   # -> runs/llava/stage1
    vlmstack train llava --recipe llava-easyvqa --out runs/llava --stage 2   # from runs/llava/stage1

Stage 1 aligns: only the projector trains, on image-caption exchanges, with the vision
tower and the LM frozen. Stage 2 instruction-tunes projector and LM on conversations;
the vision tower stays frozen. Each stage's directory ends up a loadable model.
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlm import hub
from vlm.clip import load_clip
from vlm.data.mix import EasyVqaMix
from vlm.data.sources import conversation_records
from vlm.errors import VlmError
from vlm.llava import LlavaArchitecture, LlavaModel, build_llava
from vlm.lm import load_lm
from vlm.schema import schema_field
from vlm.train.recipes import load_recipe
from vlm.train.splits import split_by_image
from vlm.train.trainer import TrainConfig
from vlm.train.vlm_stage import train_stage
from vlm.vision import VisionTower

log = logging.getLogger(__name__)
STAGES = ("all", "1", "2")


@dataclass
class StageRecipe:
    data: str = "easyvqa:train"  # built-in split, caption file (stage 1) or LLaVA JSON (stage 2)
    mix: EasyVqaMix = field(default_factory=EasyVqaMix)  # stage 2, built-in data: yes/no and recall questions added
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class LlavaRecipe:
    vision: str = "clip-easyvqa"  # any CLIP load_clip accepts, with a ViT image tower
    vision_layer: int = -2  # transformer block whose patch tokens are used (-2 = penultimate)
    lm: str = "lm-easyvqa"  # any causal LM load_lm accepts
    model: LlavaArchitecture = field(default_factory=LlavaArchitecture)  # projector, max_length
    val_fraction: float = 0.02  # images held out of the training data for validation loss
    stage1: StageRecipe = field(default_factory=StageRecipe)  # captions; projector only
    stage2: StageRecipe = field(default_factory=StageRecipe)  # conversations; projector + LM
    schema_version: int = schema_field()


def train_llava(
    recipe_spec: str, out: str | Path, *, stage: str = "all", resume: bool = False, init: str | None = None
) -> dict:
    """Run stage 1, stage 2, or both ("all"); returns the last stage's validation metrics."""
    if stage not in STAGES:
        raise VlmError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    recipe, recipe_json = load_recipe(LlavaRecipe, recipe_spec, "llava")
    out = Path(out)
    metrics = {}
    if stage in ("all", "1"):
        stage1_done = (out / "stage1" / hub.CARD_FILE).is_file()
        if stage == "all" and resume and stage1_done:
            log.info("stage 1 already finished in %s", out / "stage1")
        else:
            torch.manual_seed(recipe.stage1.train.seed)  # the projector's initialisation
            model = _new_model(recipe)
            metrics = _run_stage(model, recipe, recipe_json, 1, out / "stage1", resume=resume)
    if stage in ("all", "2"):
        start = hub.resolve_dir(init or out / "stage1")
        if start is None or hub.model_kind(start) != "llava":
            raise VlmError(
                f"stage 2 starts from a LLaVA model; {init or out / 'stage1'} is none (run --stage 1 first or pass --init DIR)"
            )
        metrics = _run_stage(LlavaModel.load(start), recipe, recipe_json, 2, out, resume=resume)
    return metrics


def _new_model(recipe: LlavaRecipe) -> LlavaModel:
    vision = VisionTower.from_clip(load_clip(recipe.vision), layer=recipe.vision_layer)
    lm, tokenizer = load_lm(recipe.lm)
    return build_llava(vision=vision, lm=lm, tokenizer=tokenizer, **vars(recipe.model))


def freeze_for_stage(model: LlavaModel, stage: int) -> None:
    """Stage 1: only the projector learns. Stage 2: projector and LM. Never the vision tower."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("projector.") or (stage == 2 and name.startswith("lm."))


def _run_stage(
    model: LlavaModel, recipe: LlavaRecipe, recipe_json: dict, stage: int, run_dir: Path, *, resume: bool
) -> dict:
    stage_recipe = recipe.stage1 if stage == 1 else recipe.stage2
    freeze_for_stage(model, stage)
    kind = "captions" if stage == 1 else "conversations"
    records = conversation_records(stage_recipe.data, kind=kind, mix=stage_recipe.mix)
    train_records, val_records = split_by_image(records, recipe.val_fraction)
    card = {"kind": "llava", "stage": stage, "recipe": recipe_json, "resolved_recipe": asdict(recipe)}
    return train_stage(
        model,
        records=train_records,
        val_records=val_records,
        config=stage_recipe.train,
        run_dir=run_dir,
        resume=resume,
        card=card,
    )
