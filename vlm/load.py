"""`load_vlm`: a visual question-answering model by shipped name or directory (ours, or a
Hugging Face LLaVA checkpoint directory: vlm/hf_import.py), or `hf:ORG/NAME` (a hub
repository, downloaded first: vlm/download.py)."""

import logging

import torch

from vlm import download, hub
from vlm.errors import VlmError

log = logging.getLogger(__name__)
VQA_KINDS = ("llava", "flamingo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype choices


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name; bfloat16 only where the CPU computes it natively
    (elsewhere it is emulated, many times slower), else float32 with a warning.

    Raises:
        VlmError: an unknown name.
    """
    from vlm.train.trainer import native_bf16

    if name not in DTYPES:
        raise VlmError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    if DTYPES[name] == torch.bfloat16 and not native_bf16():
        log.warning("bfloat16 is off: this CPU has no native bfloat16 (AVX512-BF16 or AMX); computing in float32")
        return torch.float32
    return DTYPES[name]


def load_vlm(spec: str, *, trust_remote_code: bool = False, dtype: str = "float32", quantize: str | None = None):
    """A LlavaModel or FlamingoModel, ready to answer.

    Args:
        spec: a shipped name, a model directory, an adapter directory (vlm/adapters.py:
            loaded on its base), or `hf:ORG/NAME`.
        dtype: "float32" or "bfloat16", the dtype the model computes in (see compute_dtype).
        quantize: None, or "int8": dynamic int8 linear layers (vlm/quantize.py; float32 only).
        trust_remote_code: allow a model whose language model runs Python code saved with
            it (an imported OpenFlamingo with MPT): only for sources you trust.
    Raises:
        VlmError: not a shipped name, model directory of a VQA model or HF LLaVA checkpoint;
            a download that failed; remote code without `trust_remote_code`; an adapter
            whose base is missing or changed.
    """
    from vlm.quantize import check_quantize, quantize_int8

    torch_dtype = compute_dtype(dtype)
    check_quantize(quantize, torch_dtype)
    model = _load(spec, trust_remote_code, dtype, torch_dtype)
    if quantize != "int8":
        return model
    if any(".lora_" in name for name, _ in model.named_parameters()):  # an adapter: int8 layers hold no LoRA branch
        from vlm.adapters import merge_lora

        merge_lora(model)
    return quantize_int8(model)


def _load(spec: str, trust_remote_code: bool, dtype: str, torch_dtype: torch.dtype):
    directory = download.download(spec) if download.is_hub_spec(spec) else hub.resolve_dir(spec)
    kind = hub.model_kind(directory) if directory else None
    if kind == "lm":  # a Hugging Face checkpoint: config.json with a model_type
        from vlm.hf_import import load_hf_llava

        return load_hf_llava(directory, dtype=torch_dtype)
    if kind == "llava":
        from vlm.llava import LlavaModel

        return LlavaModel.load(directory, trust_remote_code=trust_remote_code).to(torch_dtype)
    if kind == "flamingo":
        from vlm.flamingo import FlamingoModel

        return FlamingoModel.load(directory, trust_remote_code=trust_remote_code).to(torch_dtype)
    if kind == "adapter":
        from vlm.adapters import load_adapted

        return load_adapted(directory, trust_remote_code=trust_remote_code, dtype=dtype)
    names = [n for n in hub.shipped_names() if hub.model_kind(hub.WEIGHTS_DIR / n) in VQA_KINDS]
    what = f"a {kind} model, not a VQA model" if kind else "not a shipped name or model directory"
    raise VlmError(
        f"{spec!r} is {what}; VQA models: {', '.join(names) or 'none shipped'}, "
        "a LLaVA/Flamingo directory, an adapter directory, a Hugging Face LLaVA directory or hf:ORG/NAME"
    )


def is_vqa_directory(directory) -> bool:
    """True for a model directory load_vlm takes: our LLaVA/Flamingo, or a Hugging Face LLaVA checkpoint."""
    kind = hub.model_kind(directory)
    return kind in (*VQA_KINDS, "adapter") or (kind == "lm" and hub.read_config(directory).get("model_type") == "llava")
