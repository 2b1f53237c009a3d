"""Import an OpenFlamingo checkpoint (open_flamingo 2.x `checkpoint.pt`) as a vlmstack
Flamingo model directory (vlm/flamingo.py).

    vlmstack import openflamingo --checkpoint checkpoint.pt \\
        --vision open_clip:ViT-L-14-quickgelu/openai --lm anas-awadalla/mpt-1b-redpajama-200b \\
        --cross-attn-every 1 --out openflamingo-3b --trust-remote-code

checkpoint.pt holds only what OpenFlamingo trained: `perceiver.*` (the resampler),
`lang_encoder.<layers>.<i>.gated_cross_attn_layer.*` (the blocks in front of every N-th
decoder layer, (i + 1) % N == 0) and the LM's input embedding matrix, of which only the
rows of the two tokens OpenFlamingo adds were trained (`<|endofchunk|>` then `<image>`,
appended in that order). The vision tower and the LM come from their own weights.

How OpenFlamingo's model maps onto ours (all config, no special cases):
- vision: open_clip ViT patch tokens of the last block, class token dropped, WITHOUT
  ln_post (OpenFlamingo ran on open_clip 2.16, before ln_post was applied to tokens);
- resampler: depth 6, 64 latents, 8 heads x 64, feed-forward x4, no time embeddings; its
  attention (latents attend to [media; latents], both layer-normed) and final norm are ours;
- cross-attention: 8 heads x 64, feed-forward x4, tanh gates.
The LM's output rows of the two new tokens are never trained by OpenFlamingo (no
lm_head in the checkpoint); an untied LM keeps the rows resizing gives them.

OpenFlamingo's VQA prompt is `<image>Question:{question} Short answer:` (few-shot:
each example `<image>Question:{q} Short answer:{a}<|endofchunk|>`). vlmstack's own
few-shot format (vlm/chat_template.py encode_fewshot) is `<image>Question: q Answer:`;
prompt an imported model in OpenFlamingo's format for its published accuracy.

An LM whose Python code ships with it (MPT: config.json auto_map) has those files copied
into the model directory (listed in model_card.json as "lm_code"), and its auto_map made
to point there; loading the directory then needs trust_remote_code (--trust-remote-code).
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from vlm import hub
from vlm.clip import load_clip
from vlm.errors import VlmError
from vlm.flamingo import FlamingoModel, build_flamingo
from vlm.lm import CHUNK_END, IMAGE_TOKEN, decoder_layers, load_lm, local_reference, remote_code_files
from vlm.resampler import ResamplerConfig
from vlm.vision import VisionConfig, VisionTower

log = logging.getLogger(__name__)

PROMPT_FORMAT = "<image>Question:{question} Short answer:"  # OpenFlamingo's VQA prompt
ADDED_TOKENS = (CHUNK_END, IMAGE_TOKEN)  # OpenFlamingo's order: ids V, V + 1
RESAMPLER = ResamplerConfig(depth=6, heads=8, head_dim=64, num_latents=64, ff_mult=4, time_embeddings=False)
XATTN_HEADS, XATTN_HEAD_DIM = 8, 64
MAX_LENGTH = 2048  # tokens per sequence, lowered to the LM's positions when it has fewer
PERCEIVER, LANG = "perceiver.", "lang_encoder."
BLOCK = "gated_cross_attn_layer"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an OpenFlamingo checkpoint.pt (plain, or under "model_state_dict"),
    loaded with weights_only=True.

    Raises:
        VlmError: a missing file or one that is not a plain tensor checkpoint.
    """
    if not path.is_file():
        raise VlmError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refusals and corrupt files raise many types
        raise VlmError(f"{path}: not a plain tensor checkpoint ({type(e).__name__}); pass OpenFlamingo's checkpoint.pt")
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VlmError(f"{path}: not a state dict of tensors; pass OpenFlamingo's checkpoint.pt")
    return {k.removeprefix("module."): v for k, v in state.items()}


def needs_remote_code(lm: str) -> bool:
    """True if the LM directory's config.json names its own Python code (auto_map, e.g. MPT)."""
    directory = hub.resolve_dir(lm)
    config = Path(directory or lm) / "config.json"
    return config.is_file() and "auto_map" in json.loads(config.read_text())


def copy_lm_code(lm: str, config: dict, out: Path) -> list[str]:
    """Copy the Python files an LM's auto_map names, and the files they import, from the
    LM's directory (or the hub cache load_lm filled) into `out`; returns their names."""
    from transformers.dynamic_module_utils import get_relative_import_files
    from transformers.utils import cached_file

    source = str(hub.resolve_dir(lm) or lm)
    copied = []
    for name in remote_code_files(config):
        path = cached_file(source, name)
        for file in [path, *get_relative_import_files(path)]:
            shutil.copyfile(file, out / Path(file).name)
            copied.append(Path(file).name)
    return sorted(set(copied))


def vision_tower(spec: str) -> VisionTower:
    """OpenFlamingo's vision features from a CLIP spec: last block, no class token, no ln_post."""
    clip = load_clip(spec)
    tower = VisionTower(config=VisionConfig(clip=clip.config, layer=-1, keep_cls=False, ln_post=False))
    tower.visual.load_state_dict(clip.model.visual.state_dict())
    return tower


def add_openflamingo_tokens(lm: nn.Module, tokenizer) -> list[int]:
    """Add `<|endofchunk|>` then `<image>` (those missing) as OpenFlamingo does, so their ids
    match the checkpoint's embedding rows; grows the embeddings if needed. Returns the ids."""
    missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))


def module_name(root: nn.Module, module: nn.Module) -> str:
    """The dotted name of `module` inside `root`."""
    return next(name for name, m in root.named_modules() if m is module)


def map_keys(model: FlamingoModel, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenFlamingo keys -> ours for the resampler and the cross-attention blocks; returns
    (our state, checkpoint keys that map to nothing). The embedding key is left out."""
    layers = module_name(model.lm, decoder_layers(model.lm))  # e.g. model.layers
    their_layers = f"{LANG}{layers}."
    embedding = f"{LANG}{module_name(model.lm, model.lm.get_input_embeddings())}.weight"
    mapped, unexpected = {}, []
    for key, value in state.items():
        if key.startswith(PERCEIVER):
            mapped["resampler." + key.removeprefix(PERCEIVER)] = value
        elif key.startswith(their_layers) and f".{BLOCK}." in key:
            index, rest = key.removeprefix(their_layers).split(f".{BLOCK}.", 1)
            mapped[f"lm.{layers}.{index}.xattn.{rest}"] = value
        elif key != embedding:
            unexpected.append(key)
    return mapped, unexpected


def load_checkpoint(model: FlamingoModel, state: dict[str, torch.Tensor], name: str) -> None:
    """Copy the checkpoint's resampler, cross-attention blocks and new token rows into `model`.

    Raises:
        VlmError: missing or unexpected keys, or shapes that do not fit (one line).
    """
    mapped, unexpected = map_keys(model, state)
    ours = {k for k in model.state_dict() if k.startswith("resampler.") or ".xattn." in k}
    missing = sorted(ours - set(mapped))
    unexpected += sorted(set(mapped) - ours)
    if missing or unexpected:
        first = ", ".join(
            f"first {kind}: {keys[0]}" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys
        )
        raise VlmError(
            f"{name}: {len(missing)} missing and {len(unexpected)} unexpected keys ({first}); "
            "pass the --lm and --cross-attn-every the checkpoint was trained with"
        )
    try:
        model.load_state_dict(mapped, strict=False)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise VlmError(f"{name}: weights do not fit ({detail[:300]}); check --vision and --lm") from None
    copy_token_rows(model, state, name)


def copy_token_rows(model: FlamingoModel, state: dict[str, torch.Tensor], name: str) -> None:
    """The trained rows of `<|endofchunk|>` and `<image>` into the LM's input embeddings."""
    embeddings = model.lm.get_input_embeddings()
    key = f"{LANG}{module_name(model.lm, embeddings)}.weight"
    if key not in state:
        raise VlmError(f"{name}: no {key} (the new tokens' embeddings); pass the --lm the checkpoint was trained with")
    rows = state[key]  # (V', H)
    ids = [model.tokenizer.convert_tokens_to_ids(t) for t in ADDED_TOKENS]
    if rows.ndim != 2 or rows.shape[1] != embeddings.embedding_dim or rows.shape[0] <= max(ids):
        raise VlmError(
            f"{name}: {key} is {tuple(rows.shape)}, needs > {max(ids)} rows of {embeddings.embedding_dim}; "
            "pass the --lm the checkpoint was trained with"
        )
    with torch.no_grad():
        embeddings.weight[ids] = rows[ids].to(embeddings.weight.dtype)


def import_openflamingo(
    *, checkpoint: str, vision: str, lm: str, cross_attn_every: int, out: str, trust_remote_code: bool = False
) -> Path:
    """Write an OpenFlamingo checkpoint as a vlmstack Flamingo model directory at `out`.

    Args:
        checkpoint: OpenFlamingo's checkpoint.pt (read with weights_only=True).
        vision: the CLIP it was trained on, e.g. "open_clip:ViT-L-14@/path/to/weights".
        lm: the language model directory or hub id it was trained on.
        cross_attn_every: OpenFlamingo's cross_attn_every_n_layers.
        trust_remote_code: allow an LM whose config runs its own Python code (MPT).
    Returns:
        The directory written.
    Raises:
        VlmError: remote code not allowed, or any input that does not fit (one line).
    """
    if cross_attn_every < 1:
        raise VlmError(f"--cross-attn-every must be at least 1, not {cross_attn_every}")
    if needs_remote_code(lm) and not trust_remote_code:
        raise VlmError(
            f"{lm} runs its own Python code (config.json auto_map); pass --trust-remote-code only if you trust its source"
        )
    state = read_checkpoint(Path(checkpoint).expanduser())
    tower = vision_tower(vision)
    language_model, tokenizer = load_lm(lm, trust_remote_code=trust_remote_code)
    add_openflamingo_tokens(language_model, tokenizer)
    lm_config = language_model.config.to_dict()
    if remote_code_files(lm_config):  # code from another repository is copied next to ours
        language_model.config.auto_map = {
            auto: [local_reference(r) if r else r for r in ref]
            if isinstance(ref, (list, tuple))
            else local_reference(ref)
            for auto, ref in lm_config["auto_map"].items()
        }
    positions = getattr(language_model.config, "max_position_embeddings", MAX_LENGTH)
    model = build_flamingo(
        vision=tower,
        lm=language_model,
        tokenizer=tokenizer,
        resampler=RESAMPLER,
        cross_attn_every=cross_attn_every,
        xattn_heads=XATTN_HEADS,
        xattn_head_dim=XATTN_HEAD_DIM,
        max_length=min(MAX_LENGTH, positions),
    )
    load_checkpoint(model, state, checkpoint)
    model.save(out)
    if remote_code_files(lm_config):
        hub.update_card(out, lm_code=copy_lm_code(lm, lm_config, Path(out)))
    log.info("imported %s as %s (prompt format: %s)", checkpoint, out, PROMPT_FORMAT)
    return Path(out)
