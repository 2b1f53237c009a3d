"""LoRA adapters (peft) on the language model of a visual language model, saved apart
from the model they adapt.

    model = load_vlm("llava-easyvqa")
    add_lora(model, AdapterSettings(rank=8, targets=default_targets(model)))  # base frozen by the trainer
    ...train (vlm/finetune.py)...
    save_adapter(model, "my-adapter", adapter_config)
    model = load_adapted("my-adapter")            # base + adapter; refused if the base changed
    merge_lora(model).save("my-model")            # LoRA folded into the weights: a standalone model

Besides LoRA, an adapter can retrain the embedding rows of a few tokens (peft's trainable
tokens; the output head's rows with them, tied or not). LoRA only changes the hidden states:
a token whose rows the base never trained, because its text never used it, stays barely
reachable; whether greedy decoding says it then depends on the seed
(docs/experiments/2026-12-02-lora-caption-style.md).

An adapter directory holds config.json ({"kind": "adapter"}: the base as named when
fine-tuning, a fingerprint of the base's weights files, the LoRA settings, the modules
trained fully), adapter.safetensors (the LoRA matrices, the retrained token rows and those
modules, float32) and model_card.json. `load_vlm` takes an adapter directory like a model
directory.
"""

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import TrainableTokensWrapper
from safetensors.torch import save_file
from torch import nn

from vlm import download, hub
from vlm.atomic import atomic_path
from vlm.errors import VlmError
from vlm.hashing import sha256_file
from vlm.schema import from_dict, schema_field

log = logging.getLogger(__name__)
ADAPTER_FILE = "adapter.safetensors"
XATTN_MODULES = r".*\.xattn\..*"  # Flamingo's cross-attention blocks sit inside the LM but are not the LM
TOKEN_ROWS = "trainable_tokens_delta"  # peft's name for the retrained embedding rows


@dataclass
class AdapterSettings:
    """How the LM is adapted."""

    rank: int = 8  # LoRA rank r: each adapted (out, in) matrix gains r * (in + out) parameters
    alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / rank) * B @ A
    dropout: float = 0.0  # dropout on the LoRA branch's input while training
    targets: list[str] = field(default_factory=list)  # LM Linear module names (or name suffixes) given LoRA
    full: list[str] = field(default_factory=list)  # model submodules trained fully (projector, resampler, ...)
    tokens: list[int] = field(default_factory=list)  # token ids whose input and output embedding rows are trained


@dataclass(kw_only=True)
class AdapterConfig:
    base: str  # the base as named when fine-tuning: a shipped name, an absolute directory or hf:ORG/NAME
    base_fingerprint: str  # of the base's weights files (base_fingerprint()); a changed base is refused
    base_kind: str  # "llava" or "flamingo", what load_vlm makes of the base
    settings: AdapterSettings
    quantized_base: str | None = None  # "int8" if the base was int8 while training (QLoRA-style)
    kind: str = field(default="adapter", init=False)
    schema_version: int = schema_field()


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Names of the LM's Linear layers inside its decoder (attention and MLP), not the
    output head and not Flamingo's cross-attention blocks."""
    return sorted({name.rsplit(".", 1)[-1] for name in _decoder_linear_paths(model)})


def default_targets(model: nn.Module) -> list[str]:
    """Names of the Linear layers of the decoder's self-attention (q/k/v/o, MPT's Wqkv and
    out_proj): LoRA's own choice, about 40% of the parameters that adapting the MLP as well would take.

    Raises:
        VlmError: no Linear layer sits in a module named like attention (pass targets).
    """
    names = sorted(
        {
            path.rsplit(".", 1)[-1]
            for path in _decoder_linear_paths(model)
            if any("attn" in part or "attention" in part for part in path.split(".")[:-1])
        }
    )
    if not names:
        raise VlmError(
            f"no attention layer found in the language model; choose LoRA targets among "
            f"{', '.join(decoder_linear_names(model))} (--lora-targets)"
        )
    return names


def _decoder_linear_paths(model: nn.Module) -> list[str]:
    head = model.lm.get_output_embeddings()
    return [
        name
        for name, module in model.lm.named_modules()
        if isinstance(module, nn.Linear) and module is not head and ".xattn." not in f".{name}."
    ]


def token_row_layers(lm: nn.Module, tokens: list[int]) -> list[int] | dict[str, list[int]] | None:
    """peft's trainable_token_indices for `tokens`: the input embedding's rows, which a tied
    output head shares; an untied head is named too, as its rows are what makes a token said."""
    if not tokens:
        return None
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return list(tokens)
    names = {module: name for name, module in lm.named_modules()}
    return {names[embedding]: list(tokens), names[head]: list(tokens)}


def add_lora(model: nn.Module, settings: AdapterSettings) -> nn.Module:
    """Inject LoRA layers (B = 0) and the trainable token rows (copies of the base's rows)
    into `model.lm` in place: the model is unchanged until trained.

    Raises:
        VlmError: no LM Linear layer matches settings.targets.
    """
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        exclude_modules=XATTN_MODULES if any(".xattn." in name for name, _ in model.lm.named_modules()) else None,
        trainable_token_indices=token_row_layers(model.lm, settings.tokens),
    )
    try:
        inject_adapter_in_model(config, model.lm, adapter_name="default")
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise VlmError(
            f"LoRA targets {', '.join(settings.targets)} match no layer of the language model "
            f"({str(e).splitlines()[0][:160]}); its Linear layers: {', '.join(decoder_linear_names(model))}"
        ) from None
    return model


def adapter_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """peft's layers in `model`: LoRA-wrapped Linear layers and token-row layers."""
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the LoRA branches and retrained token rows on or off (off: the LM computes
    exactly as its base)."""
    for layer in adapter_layers(model):
        layer.enable_adapters(enabled)


def is_adapter_tensor(name: str, settings: AdapterSettings) -> bool:
    """Whether a parameter or state-dict entry belongs to the adapter (and is trained)."""
    return ".lora_" in name or f".{TOKEN_ROWS}." in name or name.startswith(tuple(f"{m}." for m in settings.full))


def adapter_state(model: nn.Module, settings: AdapterSettings) -> dict[str, torch.Tensor]:
    """The tensors an adapter saves: LoRA matrices, token rows and the fully trained
    modules' state; a tensor shared by two modules (a tied head's rows) once, under its
    first name."""
    state, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if is_adapter_tensor(name, settings) and id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor.detach().float().contiguous()
    return state


def adapter_parameters(model: nn.Module, settings: AdapterSettings) -> int:
    return sum(t.numel() for t in adapter_state(model, settings).values())


def base_directory(spec: str) -> Path | None:
    """The directory of a base named as load_vlm takes it (hf:ORG/NAME from the HF cache)."""
    return download.download(spec) if download.is_hub_spec(spec) else hub.resolve_dir(spec)


def base_name(spec: str) -> str:
    """How an adapter names its base: shipped names and hf: specs as given, directories absolute."""
    if download.is_hub_spec(spec) or spec in hub.shipped_names():
        return spec
    return str(Path(spec).expanduser().resolve())


def base_fingerprint(directory: Path) -> str:
    """sha256 over the sha256 of each *.safetensors file of a model directory (sharded
    Hugging Face checkpoints have several), first 16 hex digits."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise VlmError(f"{directory}: no .safetensors weights to fingerprint")
    digests = "".join(f"{f.name}:{sha256_file(f)}\n" for f in files)
    return hashlib.sha256(digests.encode()).hexdigest()[:16]


def save_adapter(model: nn.Module, directory: str | Path, config: AdapterConfig) -> None:
    """config.json + adapter.safetensors (atomic) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_FILE) as tmp:
        save_file(adapter_state(model, config.settings), str(tmp), metadata={"base": config.base})
    hub.save_config(directory, asdict(config))


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    directory = Path(directory)
    with hub.config_errors(directory, "adapter"):
        return from_dict(AdapterConfig, hub.read_config(directory), str(directory / hub.CONFIG_FILE))


def check_base(adapter_dir: Path, config: AdapterConfig, base: str) -> Path:
    """The base's directory, after checking its weights are the ones the adapter was trained on.

    Raises:
        VlmError: the base cannot be found, or its fingerprint differs (one line).
    """
    directory = base_directory(base)
    if directory is None:
        raise VlmError(
            f"{adapter_dir}: its base {base!r} is not a shipped name or model directory here; pass --base DIR"
        )
    found = base_fingerprint(directory)
    if found != config.base_fingerprint:
        raise VlmError(
            f"{adapter_dir}: adapter for {config.base} (weights {config.base_fingerprint}), "
            f"but {base} has weights {found}; use the model it was fine-tuned from"
        )
    return directory


def load_adapted(
    directory: str | Path, *, base: str | None = None, trust_remote_code: bool = False, dtype: str = "float32"
) -> nn.Module:
    """The adapter's base (or `base`, which must have the same weights) with the adapter
    applied, in eval mode.

    Raises:
        VlmError: not an adapter directory, a missing or changed base, damaged weights.
    """
    from vlm.load import compute_dtype, load_vlm

    directory = Path(directory)
    config = read_adapter_config(directory)
    base_dir = check_base(directory, config, base or config.base)
    model = load_vlm(str(base_dir), trust_remote_code=trust_remote_code)
    add_lora(model, config.settings)
    state, _ = hub.read_weights(directory / ADAPTER_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in adapter_state(model, config.settings)]
    if missing or unexpected:
        raise VlmError(
            f"{directory / ADAPTER_FILE}: does not fit its base (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    return model.to(compute_dtype(dtype)).eval()


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each LoRA update and retrained token row into its base weight and put the plain
    layer back: the model computes as with the adapter on, with no trace of peft left
    (save() writes a model directory any vlmstack loads; a tied head stays tied)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, TrainableTokensWrapper):
            layer = module.token_adapter
        elif isinstance(module, BaseTunerLayer) and not name.endswith(".token_adapter"):
            layer = module
        else:
            continue
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return model


def merge_adapter(directory: str | Path, out: str | Path, *, base: str | None = None) -> dict:
    """Write base + adapter as a standalone model directory; returns its model card."""
    directory, out = Path(directory), Path(out)
    if out.exists() and any(out.iterdir()):
        raise VlmError(f"{out} already exists and is not empty; choose another --out")
    config = read_adapter_config(directory)
    model = merge_lora(load_adapted(directory, base=base))
    model.save(out)
    card = {"kind": config.base_kind, "merged_from": {"adapter": str(directory.resolve()), "base": config.base}}
    card["command"] = hub.command_line()
    return hub.update_card(out, **card)
