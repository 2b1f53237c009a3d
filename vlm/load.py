"""`load_vlm`: a visual question-answering model by shipped name or directory (ours, or a
Hugging Face LLaVA checkpoint directory: vlm/hf_import.py)."""

from vlm import hub
from vlm.errors import VlmError

VQA_KINDS = ("llava", "flamingo")


def load_vlm(spec: str):
    """A LlavaModel or FlamingoModel, ready to answer.

    Raises:
        VlmError: not a shipped name, model directory of a VQA model or HF LLaVA checkpoint.
    """
    directory = hub.resolve_dir(spec)
    kind = hub.model_kind(directory) if directory else None
    if kind == "lm":  # a Hugging Face checkpoint: config.json with a model_type
        from vlm.hf_import import load_hf_llava

        return load_hf_llava(directory)
    if kind == "llava":
        from vlm.llava import LlavaModel

        return LlavaModel.load(directory)
    if kind == "flamingo":
        from vlm.flamingo import FlamingoModel

        return FlamingoModel.load(directory)
    names = [n for n in hub.shipped_names() if hub.model_kind(hub.WEIGHTS_DIR / n) in VQA_KINDS]
    what = f"a {kind} model, not a VQA model" if kind else "not a shipped name or model directory"
    raise VlmError(
        f"{spec!r} is {what}; VQA models: {', '.join(names) or 'none shipped'}, or a trained LLaVA/Flamingo directory"
    )


def is_vqa_directory(directory) -> bool:
    """True for a model directory load_vlm takes: our LLaVA/Flamingo, or a Hugging Face LLaVA checkpoint."""
    kind = hub.model_kind(directory)
    return kind in VQA_KINDS or (kind == "lm" and hub.read_config(directory).get("model_type") == "llava")
