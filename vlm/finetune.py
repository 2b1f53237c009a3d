"""Fine-tune a visual language model on your own pictures with LoRA: small adapters on
the language model (peft), the vision tower frozen, the projector (LLaVA) or resampler
and cross-attention blocks (Flamingo) optionally trained in full.

    vlmstack finetune llava-easyvqa --data my-captions.jsonl --out my-adapter
    vlmstack eval vqa --model my-adapter --data ...     # an adapter loads on its base
    vlmstack merge my-adapter --out my-model            # a standalone model

Data: a captions .jsonl/.csv, LLaVA conversations (.json), a VQA .jsonl/.csv, a folder of
images each with a .txt caption beside it (`vlmstack caption DIR --format txt`), or
easyvqa:train. The run directory checkpoints as it goes (`--resume` continues) and ends
up an adapter directory (vlm/adapters.py).
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from vlm import hub
from vlm.adapters import (
    AdapterConfig,
    AdapterSettings,
    adapter_parameters,
    add_lora,
    base_directory,
    base_fingerprint,
    base_name,
    default_targets,
    is_adapter_tensor,
    save_adapter,
)
from vlm.chat_template import IGNORE_INDEX
from vlm.data.conversations import caption_conversations
from vlm.data.sequences import encode_records
from vlm.data.sidecars import sidecar_captions
from vlm.data.sources import builtin_split, conversation_records
from vlm.errors import VlmError
from vlm.quantize import int8_base
from vlm.train.splits import split_by_image
from vlm.train.trainer import TrainConfig, Trainer, native_bf16
from vlm.train.vlm_stage import train_stage
from vlm.xattn import GatedCrossAttentionBlock

log = logging.getLogger(__name__)


def default_train_config() -> TrainConfig:
    # Two epochs of 1,000 images (122 steps) teach a new answer style: held-out train captions
    # 199/200 right, as with three; one epoch left it at 11/200. LoRA starts at B = 0 and the
    # token rows at the base's, so a rate above full fine-tuning's is safe; 1e-3 was too slow.
    # bf16 autocast only where it is native.
    return TrainConfig(
        epochs=2, batch_size=16, lr=3e-3, warmup_steps=20, weight_decay=0.0, checkpoint_every=100, bf16=native_bf16()
    )


@dataclass
class FinetuneOptions:
    rank: int = 8  # LoRA rank
    alpha: float | None = None  # LoRA alpha; None: 2 * rank
    targets: list[str] | None = None  # LM Linear layer names; None: its self-attention's (adapters.default_targets)
    train_projector: bool = False  # also train the projector (LLaVA) / resampler and cross-attention (Flamingo)
    # Also train the embedding rows of the tokens the answers use: with LoRA alone, a token its
    # base never learnt to say (rows untrained) stays at a loss of 1-4 nats, said or not by seed.
    train_tokens: bool = True
    quantize_base: str | None = None  # "int8": the frozen LM held in int8 while training (QLoRA-style)
    val_fraction: float = 0.02  # images held out for validation loss
    train: TrainConfig = field(default_factory=default_train_config)


def finetune_records(data: str) -> list[dict]:
    """LLaVA-format records from what --data names.

    Raises:
        VlmError: easyvqa:test (evaluation only), or data that cannot be read.
    """
    if builtin_split(data) == "test":
        raise VlmError("easyvqa:test is for evaluation only; fine-tune on easyvqa:train or your own data")
    if Path(data).is_dir():
        return caption_conversations(sidecar_captions(data))
    return conversation_records(data)


def connector_modules(model: nn.Module) -> list[str]:
    """What links the vision tower to the LM: LLaVA's projector; Flamingo's resampler and
    gated cross-attention blocks."""
    names = [name for name in ("projector", "resampler") if hasattr(model, name)]
    return names + [name for name, m in model.named_modules() if isinstance(m, GatedCrossAttentionBlock)]


def answer_tokens(model: nn.Module, records: list[dict]) -> list[int]:
    """The token ids the loss falls on (answers and their end token), as the model encodes
    `records`."""
    tokens = set()
    for _, labels, _ in encode_records(records, model, model.max_length):
        tokens.update(label for label in labels if label != IGNORE_INDEX)
    return sorted(tokens)


def prepare(model: nn.Module, options: FinetuneOptions, tokens: list[int]) -> AdapterSettings:
    """LoRA (and trainable rows for `tokens` if options.train_tokens) into `model` (int8
    base first if asked), and everything frozen but those and the modules trained in full.
    Returns the adapter's settings."""
    settings = AdapterSettings(
        rank=options.rank,
        alpha=options.alpha if options.alpha is not None else 2.0 * options.rank,
        targets=list(options.targets or default_targets(model)),
        full=connector_modules(model) if options.train_projector else [],
        tokens=list(tokens) if options.train_tokens else [],
    )
    if options.quantize_base not in (None, "int8"):
        raise VlmError(f"unknown --quantize-base {options.quantize_base!r}; choose int8")
    if options.quantize_base == "int8":
        head = model.lm.get_output_embeddings()  # tied to the input embeddings: left alone
        int8_base(model.lm, keep=lambda name, linear: linear is head or ".xattn." in f".{name}.")
    add_lora(model, settings)
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_tensor(name, settings)
    return settings


def finetune(
    base: str, data: str, out: str | Path, *, options: FinetuneOptions, resume: bool = False, trust_remote_code=False
) -> dict:
    """Fine-tune `base` (anything load_vlm takes) on `data`; `out` becomes an adapter
    directory. Returns the adapter's model card.

    Raises:
        VlmError: unreadable data or base, an `out` that holds another run (without resume).
    """
    from vlm.load import load_vlm

    out = Path(out)
    records = finetune_records(data)
    base_dir = base_directory(base)
    if base_dir is not None and hub.model_kind(base_dir) == "adapter":
        raise VlmError(f"{base}: fine-tune a model, not an adapter; merge the adapter first (vlmstack merge)")
    model = load_vlm(base, trust_remote_code=trust_remote_code)  # refuses what is not a VQA model
    base_parameters = sum(p.numel() for p in model.parameters())
    train_records, val_records = split_by_image(records, options.val_fraction, image=_first_image)
    settings = prepare(model, options, answer_tokens(model, train_records))
    config = AdapterConfig(
        base=base_name(base),
        base_fingerprint=base_fingerprint(base_dir),
        base_kind=model.config.kind,
        settings=settings,
        quantized_base=options.quantize_base,
    )
    card = {}

    def save(trainer: Trainer, metrics: dict) -> None:
        save_adapter(model, out, config)
        adapter = adapter_parameters(model, settings)
        card.update(
            hub.write_run_card(
                out,
                model=model,
                train_seconds=trainer.train_seconds,
                validation=metrics,
                kind="adapter",
                base=config.base,
                data=data,
                options=asdict(options),
                adapter_parameters=adapter,
                base_parameters=base_parameters,
                adapter_share=round(adapter / base_parameters, 5),
            )
        )

    train_stage(
        model,
        records=train_records,
        val_records=val_records,
        config=options.train,
        run_dir=out,
        resume=resume,
        card={},
        save=save,
    )
    return card


def _first_image(record: dict):
    return record.get("image") or (record.get("images") or [None])[0]
