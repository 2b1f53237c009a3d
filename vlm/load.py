"""`load_vlm`: a visual question-answering model by shipped name or directory (ours, or a
Hugging Face LLaVA checkpoint directory: vlm/hf_import.py), or `hf:ORG/NAME` (a hub
repository, downloaded first: vlm/download.py)."""

from vlm import download, hub
from vlm.errors import VlmError

VQA_KINDS = ("llava", "flamingo")


def load_vlm(spec: str, *, trust_remote_code: bool = False):
    """A LlavaModel or FlamingoModel, ready to answer.

    Args:
        spec: a shipped name, a model directory, or `hf:ORG/NAME`.
        trust_remote_code: allow a model whose language model runs Python code saved with
            it (an imported OpenFlamingo with MPT): only for sources you trust.
    Raises:
        VlmError: not a shipped name, model directory of a VQA model or HF LLaVA checkpoint;
            a download that failed; remote code without `trust_remote_code`.
    """
    directory = download.download(spec) if download.is_hub_spec(spec) else hub.resolve_dir(spec)
    kind = hub.model_kind(directory) if directory else None
    if kind == "lm":  # a Hugging Face checkpoint: config.json with a model_type
        from vlm.hf_import import load_hf_llava

        return load_hf_llava(directory)
    if kind == "llava":
        from vlm.llava import LlavaModel

        return LlavaModel.load(directory, trust_remote_code=trust_remote_code)
    if kind == "flamingo":
        from vlm.flamingo import FlamingoModel

        return FlamingoModel.load(directory, trust_remote_code=trust_remote_code)
    names = [n for n in hub.shipped_names() if hub.model_kind(hub.WEIGHTS_DIR / n) in VQA_KINDS]
    what = f"a {kind} model, not a VQA model" if kind else "not a shipped name or model directory"
    raise VlmError(
        f"{spec!r} is {what}; VQA models: {', '.join(names) or 'none shipped'}, "
        "a LLaVA/Flamingo directory, a Hugging Face LLaVA directory or hf:ORG/NAME"
    )


def is_vqa_directory(directory) -> bool:
    """True for a model directory load_vlm takes: our LLaVA/Flamingo, or a Hugging Face LLaVA checkpoint."""
    kind = hub.model_kind(directory)
    return kind in VQA_KINDS or (kind == "lm" and hub.read_config(directory).get("model_type") == "llava")
