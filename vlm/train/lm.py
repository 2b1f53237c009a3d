"""Recipe: pretrain a causal language model on text.

    vlmstack train lm --recipe lm-easyvqa --out runs/lm

(Recipes are pipelines of phases, run by vlm/train/pipeline.py; `train_lm` is one phase.)

Builds the tiny Llama-style default (and trains its BPE tokenizer on the corpus), or
continues training any Hugging Face LM (`init`). The run directory ends up a Hugging Face
model directory (save_pretrained), loadable by `load_lm` and AutoModelForCausalLM.
"""

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from vlm import hub
from vlm.chat_template import ROLES, encode_conversation, from_llava, start_ids
from vlm.data import easyvqa
from vlm.data.conversations import easyvqa_conversations
from vlm.data.mix import EasyVqaMix
from vlm.data.sequences import CollateSequences, TokenDataset
from vlm.data.sources import builtin_split
from vlm.errors import VlmError
from vlm.lm import IMAGE_TOKEN, TinyLmConfig, build_tiny_lm, load_lm, train_tokenizer
from vlm.train import distributed
from vlm.train.objectives import LanguageModelLoss
from vlm.train.trainer import TrainConfig, Trainer, param_groups

log = logging.getLogger(__name__)


@dataclass
class LmRecipe:
    data: str = "easyvqa:train"  # built-in split (its conversations, each image written as its caption) or a .txt file, one document per line
    mix: EasyVqaMix = field(
        default_factory=EasyVqaMix
    )  # built-in data: yes/no and recall questions added (not its Flamingo fields)
    init: str | None = None  # continue training this LM (directory or hub id) instead of a new tiny one
    model: TinyLmConfig = field(default_factory=TinyLmConfig)  # the tiny LM (ignored with init)
    max_length: int = 256  # tokens per training sequence; longer documents are cut
    val_fraction: float = 0.02  # documents held out for the validation loss
    train: TrainConfig = field(default_factory=TrainConfig)
    model_fields: ClassVar = frozenset({"init", "model"})  # build the model: set once per pipeline


def corpus(spec: str, mix: EasyVqaMix | None = None) -> list[list[tuple[str, str]] | str]:
    """Documents: chat conversations (turns) for a built-in split, lines of a .txt file.

    In a built-in split's conversations each image is written as its caption, "(a red
    circle)": the LM learns to answer from what the image shows — "is there a red shape?"
    compared with the colour in context — and the VLMs then only have to bring that into
    the LM from pixels. (With the image left out, the text says nothing about which colour
    is present; an LM pretrained so learns to ignore the colour in a question, and a VLM
    built on it kept ignoring it.)
    """
    split = builtin_split(spec)
    if split:
        captions = {image.path: image.caption for image in easyvqa.images(split)}
        return [
            [(role, text.replace(IMAGE_TOKEN, f"({captions[r['image']]})")) for role, text in from_llava(r)]
            for r in easyvqa_conversations(split, mix)
        ]
    path = Path(spec)
    if path.suffix != ".txt" or not path.is_file():
        raise VlmError(f"{spec}: expected a built-in name or an existing .txt file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _render(document) -> str:
    """A document as the text the tokenizer learns from: conversations with the role
    markers encode_conversation writes ("USER:", "ASSISTANT:"), so each is a token or two."""
    return document if isinstance(document, str) else "\n".join(f"{ROLES[role]} {text}" for role, text in document)


def _tokenize(tokenizer, document, max_length: int) -> tuple[list[int], list[int]]:
    if isinstance(document, str):
        ids = (
            start_ids(tokenizer) + tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        )
    else:
        ids = encode_conversation(tokenizer, document).ids
    ids = ids[:max_length]
    return ids, list(ids)  # plain language modelling: every token is a target


def train_lm(
    recipe: LmRecipe, out: str | Path, *, resume: bool = False, start: Path | None = None, card: dict | None = None
) -> dict:
    """Train one phase into `out`, from the model in `start` (the previous phase's) or else
    `recipe.init` or else a new tiny LM; returns the validation metrics.
    `card` adds fields to the model card (a pipeline's: phase, recipe, commit), written
    with the rest in one write."""
    out = Path(out)
    torch.manual_seed(recipe.train.seed)
    documents = corpus(recipe.data, recipe.mix)
    if start or recipe.init:
        model, tokenizer = load_lm(str(start or recipe.init))
    else:
        tokenizer = train_tokenizer((_render(d) for d in documents), recipe.model.vocab_size)
        model = build_tiny_lm(recipe.model, tokenizer)
    sequences = [_tokenize(tokenizer, d, recipe.max_length) for d in documents]
    cut = max(1, int(len(sequences) * recipe.val_fraction)) if recipe.val_fraction > 0 else 0
    generator = torch.Generator().manual_seed(recipe.train.seed)
    order = torch.randperm(len(sequences), generator=generator).tolist()
    val = [sequences[i] for i in order[:cut]]
    train = [sequences[i] for i in order[cut:]]
    log.info(
        "%d training documents, %d validation; %d parameters",
        len(train),
        len(val),
        sum(p.numel() for p in model.parameters()),
    )
    collate = CollateSequences(tokenizer.pad_token_id)

    objective = LanguageModelLoss(model, images=False)

    def evaluate() -> dict:
        with torch.inference_mode():
            losses = [
                objective(collate([{"ids": ids, "labels": labels} for ids, labels in val[s : s + 64]])).item()
                for s in range(0, len(val), 64)
            ]
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_perplexity": math.exp(loss)}

    trainer = Trainer(
        model=model,
        groups=param_groups(model, recipe.train.weight_decay),
        config=recipe.train,
        run_dir=out,
        dataset=TokenDataset(train),
        collate=collate,
        objective=objective,
        evaluate=evaluate if val else None,
    )
    metrics = trainer.fit(resume=resume)
    if not distributed.is_main():
        return metrics
    hub.save_pretrained(model, out)  # safetensors: transformers' only format since v5
    hub.save_pretrained(tokenizer, out)
    hub.write_run_card(
        out,
        model=model,
        train_seconds=trainer.train_seconds,
        validation=metrics,
        kind="lm",
        resolved_recipe=asdict(recipe),
        **(card or {}),
    )
    return metrics
