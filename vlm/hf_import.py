"""Hugging Face LLaVA checkpoint directories (model_type "llava") as our own LlavaModel.

    model = load_hf_llava("llava-1.5-7b-hf/")     # also what load_vlm(DIR) and --model DIR do

The key tables of vlm/hf_llava.py, read backwards: CLIP's q/k/v are concatenated into
open_clip's in_proj, `vision_feature_layer` (an int) becomes our VisionConfig.layer and the
select strategy "full" keeps the class token. Both key layouts load: the hub's
(`vision_tower.vision_model.*`) and the one transformers 5 writes (`vision_tower.*`).
The checkpoint's tokenizer and image token id are used as shipped, its generation_config.json
eos ids end answers too; mean/std come from its image processor. Every checkpoint tensor must
find its place and every weight of ours must be given, except open_clip's pooled-embedding
projection, which patch features never use (set to zeros). What is not supported (SigLIP towers, lists of feature layers, other
projector activations) is refused in one line.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer

from vlm import hub
from vlm.clip import ClipConfig
from vlm.errors import VlmError
from vlm.hf_llava import LM_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX, WEIGHTS_FILE, vision_from_hf
from vlm.lm import CHUNK_END, IMAGE_TOKEN
from vlm.vision import VisionConfig

SUPPORTED_MODEL_TYPES = ("llava",)
SUPPORTED_VISION_TYPES = ("clip_vision_model",)
INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
UNUSED_WEIGHTS = ("vision.visual.proj",)  # CLIP's image projection: not part of the patch features


def hf_model_type(directory: Path) -> str | None:
    """The model_type in a directory's config.json, or None when it has none (one of ours)."""
    return hub.read_config(directory).get("model_type")


def checkpoint_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists.

    Raises:
        VlmError: no weights, a missing shard (named) or an unreadable index.
    """
    index = directory / INDEX_FILE
    if not index.is_file():
        if not (directory / WEIGHTS_FILE).is_file():
            raise VlmError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}; is the download complete?")
        return [directory / WEIGHTS_FILE]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise VlmError(f"{index}: not a safetensors index (no weight_map); fetch it again") from None
    for shard in shards:
        if not (directory / shard).is_file():
            raise VlmError(f"{directory}: missing shard {shard}; download it again")
    return [directory / shard for shard in shards]


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors files, as stored.

    Raises:
        VlmError: a missing shard (named), an unreadable index or a damaged safetensors file.
    """
    state = {}
    for path in checkpoint_files(directory):
        state.update(hub.read_weights(path)[0])
    return state


def loading_bytes(directory: Path) -> int:
    """Memory that loading takes at its peak: the tensors as stored plus their float32 copy
    in the model, read from the safetensors headers (nothing is loaded)."""
    total = 0
    for path in checkpoint_files(directory):
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    total += math.prod(tensor.get_shape()) * (DTYPE_BYTES.get(tensor.get_dtype(), 4) + 4)
        except (SafetensorError, OSError) as e:
            raise VlmError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    return total


def check_memory(directory: Path) -> None:
    """Raises VlmError, before anything is loaded, when loading would need more memory than is free."""
    need, free = loading_bytes(directory), hub.available_memory()
    if free is not None and need > free:
        raise VlmError(
            f"{directory}: loading needs about {need / 2**30:.1f} GiB of memory (the weights as stored and in "
            f"float32), {free / 2**30:.1f} GiB is free; free memory or use a machine with more"
        )


def hub_layout(key: str) -> str:
    """A checkpoint key in the hub layout: transformers 5 writes vision keys without `vision_model.`."""
    if key.startswith("vision_tower.") and not key.startswith(VISION_PREFIX):
        return VISION_PREFIX + key.removeprefix("vision_tower.")
    return key


def feature_layer(value, depth: int) -> int:
    """HF `vision_feature_layer` (an index into hidden_states, whose 0 is the embeddings) -> our
    block index (VisionConfig.layer). Raises VlmError for a list or the embeddings themselves."""
    if not isinstance(value, int):
        raise VlmError(f"vision_feature_layer {value!r}: only a single layer is supported, not a list")
    if value in (0, -(depth + 1)) or not -(depth + 1) <= value <= depth:
        raise VlmError(f"vision_feature_layer {value} is not the output of one of the {depth} vision blocks")
    return value if value < 0 else value - 1  # hidden_states[i] is block i - 1's output


def image_normalisation(directory: Path) -> tuple[tuple, tuple]:
    """(mean, std) of the checkpoint's image processor (processor_config.json or preprocessor_config.json).

    Raises:
        VlmError: neither file gives them.
    """
    for name, inside in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = directory / name
        if path.is_file():
            settings = json.loads(path.read_text())
            settings = settings.get(inside, {}) if inside else settings
            if "image_mean" in settings and "image_std" in settings:
                return tuple(settings["image_mean"]), tuple(settings["image_std"])
    raise VlmError(f"{directory}: no image_mean/image_std in preprocessor_config.json; the checkpoint is incomplete")


def vision_config(hf, directory: Path) -> VisionConfig:
    """Our VisionConfig (an open_clip ViT) for the checkpoint's CLIP vision tower.

    Raises:
        VlmError: not a CLIP tower, or one open_clip cannot build exactly.
    """
    vision = hf.vision_config
    if vision.model_type not in SUPPORTED_VISION_TYPES:
        raise VlmError(
            f"{directory}: vision tower {vision.model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_VISION_TYPES)}"
        )
    if vision.hidden_act not in ("gelu", "quick_gelu") or vision.layer_norm_eps != 1e-5:
        raise VlmError(
            f"{directory}: CLIP with hidden_act {vision.hidden_act!r} and layer_norm_eps {vision.layer_norm_eps} "
            "has no open_clip form; supported: gelu or quick_gelu with eps 1e-5"
        )
    if hf.vision_feature_select_strategy not in ("default", "full"):
        raise VlmError(f"{directory}: unknown vision_feature_select_strategy {hf.vision_feature_select_strategy!r}")
    mean, std = image_normalisation(directory)
    vision_cfg = {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "width": vision.hidden_size,
        "layers": vision.num_hidden_layers,
        "head_width": vision.hidden_size // vision.num_attention_heads,
        "mlp_ratio": vision.intermediate_size / vision.hidden_size,
    }
    model_cfg = {
        "embed_dim": vision.projection_dim,
        "quick_gelu": vision.hidden_act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": {},  # a LLaVA checkpoint has no CLIP text tower
    }
    clip = ClipConfig(model_cfg=model_cfg, image_mean=mean, image_std=std, source=f"{directory} (Hugging Face LLaVA)")
    return VisionConfig(
        clip=clip,
        layer=feature_layer(hf.vision_feature_layer, vision.num_hidden_layers),
        keep_cls=hf.vision_feature_select_strategy == "full",
    )


def projector_from_hf(hf, state: dict[str, torch.Tensor], directory: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(our projector name, its state dict) from `multi_modal_projector.linear_1/2`: GELU between
    is "mlp2x_gelu"; an identity activation with an identity linear_2 (our export of "linear") is "linear".

    Raises:
        VlmError: another activation, no bias, or missing or unexpected projector weights.
    """
    if not hf.multimodal_projector_bias:
        raise VlmError(f"{directory}: a projector without bias is not supported; supported: linear_1/2 with bias")
    expected = {f"{PROJECTOR_PREFIX}linear_{i}.{name}" for i in (1, 2) for name in ("weight", "bias")}
    unexpected = sorted(k for k in state if k.startswith(PROJECTOR_PREFIX) and k not in expected)
    if unexpected:
        raise VlmError(f"{directory}: unexpected projector weights {unexpected[:3]}; not a LLaVA projector")
    try:
        first = {name: state[f"{PROJECTOR_PREFIX}linear_1.{name}"] for name in ("weight", "bias")}
        second = {name: state[f"{PROJECTOR_PREFIX}linear_2.{name}"] for name in ("weight", "bias")}
    except KeyError as e:
        raise VlmError(f"{directory}: missing projector weight {e}; the checkpoint is damaged") from None
    identity = torch.equal(second["weight"], torch.eye(second["weight"].shape[0], dtype=second["weight"].dtype))
    if hf.projector_hidden_act == "linear" and identity and not second["bias"].any():
        return "linear", first
    if hf.projector_hidden_act == "gelu":
        return "mlp2x_gelu", {**{f"0.{k}": v for k, v in first.items()}, **{f"2.{k}": v for k, v in second.items()}}
    raise VlmError(
        f"{directory}: projector activation {hf.projector_hidden_act!r} is not supported; supported: gelu "
        "(and linear with an identity linear_2)"
    )


def our_state_dict(hf, state: dict[str, torch.Tensor], directory: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(projector name, the checkpoint's tensors under our LlavaModel's names).

    Raises:
        VlmError: a tensor that belongs to no part of a LLaVA model.
    """
    state = {hub_layout(key): tensor for key, tensor in state.items()}
    known = (VISION_PREFIX, PROJECTOR_PREFIX, LM_PREFIX)
    stray = [key for key in state if not key.startswith(known)]
    if stray:
        raise VlmError(f"{directory}: unexpected weights {stray[:3]}; not a LLaVA checkpoint this loader knows")
    projector, projector_state = projector_from_hf(hf, state, directory)
    ours = {f"vision.visual.{key}": tensor for key, tensor in vision_from_hf(state).items()}
    ours.update({f"projector.{key}": tensor for key, tensor in projector_state.items()})
    ours.update({"lm." + key.removeprefix(LM_PREFIX): t for key, t in state.items() if key.startswith(LM_PREFIX)})
    return projector, ours


def tied_names(module: torch.nn.Module) -> set[str]:
    """Names of tensors that share storage with an earlier name (tied embeddings)."""
    seen, tied = set(), set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.add(tensor.data_ptr())
    return tied


def load_weights(model, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Load our-named tensors (as float32) into `model`; only UNUSED_WEIGHTS may be missing (zeroed).

    Raises:
        VlmError: missing, unexpected or misshapen weights.
    """
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise VlmError(f"{directory}: weights do not fit ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if k not in UNUSED_WEIGHTS and k not in tied_names(model)]
    if missing or unexpected:
        raise VlmError(f"{directory}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        model.vision.visual.proj.zero_()


def tokenizer_for(hf, directory: Path):
    """The checkpoint's tokenizer; its <image> must be the config's image token. (The model
    adds <|endofchunk|> to it when missing, which must not need a new embedding row.)

    Raises:
        VlmError: unreadable, an image token that differs from the config's, or no spare row.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise VlmError(f"{directory}: cannot read the tokenizer ({str(e).splitlines()[0][:200]})") from None
    image_id = tokenizer.get_vocab().get(IMAGE_TOKEN)
    if image_id != hf.image_token_id:
        raise VlmError(
            f"{directory}: the tokenizer's {IMAGE_TOKEN} is {image_id}, the config's image token "
            f"{hf.image_token_id}; only checkpoints whose image token is {IMAGE_TOKEN} load"
        )
    if CHUNK_END not in tokenizer.get_vocab() and len(tokenizer) >= hf.text_config.vocab_size:
        raise VlmError(
            f"{directory}: the LM has no spare embedding row for {CHUNK_END}, which vlmstack adds; "
            "checkpoints with a padded vocabulary load"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(directory: Path) -> tuple[int, ...]:
    """The eos token ids of generation_config.json (an int or a list), () without the file."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos or []
    if not all(isinstance(token, int) for token in eos):
        raise VlmError(f"{path}: eos_token_id must be a token id or a list of them, not {eos!r:.80}")
    return tuple(eos)


def load_hf_llava(directory: str | Path):
    """A Hugging Face LLaVA checkpoint directory as our LlavaModel (float32, eval mode).

    Raises:
        VlmError: another model type, an unsupported part, weights that do not fit exactly,
            or more memory needed than is free (checked before loading).
    """
    from vlm.llava import LlavaConfig, LlavaModel

    directory = Path(directory)
    model_type = hf_model_type(directory)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise VlmError(
            f"{directory}: a Hugging Face {model_type} checkpoint, not a VQA model; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (or a vlmstack LLaVA/Flamingo directory)"
        )
    hf = AutoConfig.from_pretrained(str(directory))
    check_memory(directory)
    vision = vision_config(hf, directory)
    projector, state = our_state_dict(hf, read_checkpoint(directory), directory)
    tokenizer = tokenizer_for(hf, directory)
    text = hf.text_config.to_dict()
    config = LlavaConfig(
        vision=vision,
        lm=text,
        projector=projector,
        max_length=text.get("max_position_embeddings", 2048),
        stop_token_ids=stop_token_ids(directory),
    )
    with hub.config_errors(directory, "llava"):
        model = LlavaModel(config=config, tokenizer=tokenizer)
    load_weights(model, state, directory)
    return model.eval()
