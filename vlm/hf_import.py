"""Hugging Face LLaVA checkpoint directories (model_type "llava") as our own LlavaModel.

    model = load_hf_llava("llava-interleave-qwen-0.5b-hf/", dtype=torch.bfloat16)   # load_vlm / --model DIR

Vision towers: CLIP (gelu or quick_gelu; the key tables of vlm/hf_llava.py read backwards, q/k/v
concatenated into open_clip's in_proj) and SigLIP (vlm/siglip.py; its pooling head unused).
`vision_feature_layer` (an int or a list, whose tokens are concatenated) becomes
VisionConfig.layer, the select strategy "full" keeps the class token, and the projector's
activation and bias come from the config. Both key layouts load: the hub's
(`vision_tower.vision_model.*`) and the one transformers 5 writes (`vision_tower.*`).

Used as shipped: the tokenizer and image token id (nothing is added to it), the stop tokens
of generation_config.json, the processor's chat template (vlmstack's when it has none) and
its image preprocessing (resize, crop or not, pad to square). What these cannot express is
refused in one line.

The weights are copied tensor by tensor, as they are read, into a model built in the compute
dtype without initialising it: the peak is the model plus the vision tower as stored, never
a float32 copy of everything. Every checkpoint tensor must find its place and every weight of
ours must be given, except open_clip's pooled-embedding projection, which patch features never
use (set to zeros).
"""

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer
from transformers.initialization import no_init_weights

from vlm import hub
from vlm.clip import ClipConfig
from vlm.errors import VlmError
from vlm.hf_llava import LM_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX, WEIGHTS_FILE, vision_from_hf
from vlm.lm import IMAGE_TOKEN, lm_from_config
from vlm.siglip import SiglipConfig, siglip_from_hf
from vlm.vision import VisionConfig

SUPPORTED_MODEL_TYPES = ("llava",)
SUPPORTED_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "relu": "relu"}  # -> ours
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json")  # where a processor keeps it
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


def loading_bytes(directory: Path, dtype: torch.dtype) -> int:
    """Memory that loading takes at its peak, from the safetensors headers (nothing is loaded):
    every tensor in the compute `dtype` (the model), plus the vision and projector tensors as
    stored (gathered before they are renamed), plus the largest tensor as stored (being copied)."""
    compute, gathered, largest = 0, 0, 0
    for path in checkpoint_files(directory):
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    count = math.prod(tensor.get_shape())
                    stored = count * DTYPE_BYTES.get(tensor.get_dtype(), 4)
                    compute += count * dtype.itemsize
                    gathered += stored if hub_layout(key).startswith((VISION_PREFIX, PROJECTOR_PREFIX)) else 0
                    largest = max(largest, stored)
        except (SafetensorError, OSError) as e:
            raise VlmError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    return compute + gathered + largest


def check_memory(directory: Path, dtype: torch.dtype) -> None:
    """Raises VlmError, before anything is loaded, when loading would need more memory than is free."""
    need, free = loading_bytes(directory, dtype), hub.available_memory()
    if free is not None and need > free:
        raise VlmError(
            f"{directory}: loading needs about {need / 2**30:.1f} GiB of memory (the weights in {str(dtype).removeprefix('torch.')}), "
            f"{free / 2**30:.1f} GiB is free; free memory, use --dtype bfloat16, or a machine with more"
        )


def hub_layout(key: str) -> str:
    """A checkpoint key in the hub layout: transformers 5 writes vision keys without `vision_model.`."""
    if key.startswith("vision_tower.") and not key.startswith(VISION_PREFIX):
        return VISION_PREFIX + key.removeprefix("vision_tower.")
    return key


def processor_settings(directory: Path) -> dict:
    """The image processor's settings: processor_config.json's "image_processor", else preprocessor_config.json.

    Raises:
        VlmError: neither file, or one that is not JSON.
    """
    for name, inside in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = directory / name
        if not path.is_file():
            continue
        try:
            settings = json.loads(path.read_text())
        except ValueError:
            raise VlmError(f"{path}: not JSON; fetch it again") from None
        settings = settings.get(inside) if inside else settings
        if isinstance(settings, dict):
            return settings
    raise VlmError(f"{directory}: no preprocessor_config.json; the checkpoint is incomplete")


def _side(size: dict | int | None, key: str) -> int | None:
    """A square side from a processor size entry ({"shortest_edge": S}, {"height": S, "width": S} or S)."""
    if isinstance(size, int):
        return size
    if not isinstance(size, dict):
        return None
    if key in size:
        return size[key]
    return size["height"] if size.get("height") == size.get("width") else None


def preprocessing(directory: Path, image_size: int) -> dict:
    """VisionConfig's crop/pad_to_square and the mean/std of the checkpoint's image processor.

    Raises:
        VlmError: preprocessing our ImageTransform does not do exactly (another resampling,
            a crop smaller than the resize, a size other than the tower's input).
    """
    settings = processor_settings(directory)
    if "image_mean" not in settings or "image_std" not in settings:
        raise VlmError(
            f"{directory}: no image_mean/image_std in the image processor config; the checkpoint is incomplete"
        )
    crop = bool(settings.get("do_center_crop", False))
    resize = _side(settings.get("size"), "shortest_edge")
    crop_side = _side(settings.get("crop_size"), "height") if crop else resize
    problems = []
    if settings.get("resample", 3) != 3:
        problems.append(f"resample {settings['resample']} (bicubic, 3, is supported)")
    if not settings.get("do_resize", True) or not settings.get("do_normalize", True):
        problems.append("no resize or no normalisation")
    if abs(settings.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9 or not settings.get("do_rescale", True):
        problems.append(f"rescale_factor {settings.get('rescale_factor')}")
    if resize != image_size or crop_side != image_size:
        problems.append(
            f"resize {settings.get('size')} / crop {settings.get('crop_size')} for a {image_size}-pixel tower"
        )
    if problems:
        raise VlmError(f"{directory}: image preprocessing not supported: {'; '.join(problems)}")
    return {
        "crop": crop,
        "pad_to_square": bool(settings.get("do_pad", False)),
        "mean": tuple(settings["image_mean"]),
        "std": tuple(settings["image_std"]),
    }


def feature_layers(value, depth: int) -> int | tuple:
    """HF `vision_feature_layer` (an index into hidden_states, whose 0 is the embeddings; or a
    list of them) -> our block index or tuple of indices (VisionConfig.layer).

    Raises:
        VlmError: the embeddings themselves, or an index out of range.
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    blocks = []
    for index in values:
        if not isinstance(index, int) or index in (0, -(depth + 1)) or not -(depth + 1) <= index <= depth:
            raise VlmError(f"vision_feature_layer {value!r}: not the output of one of the {depth} vision blocks")
        blocks.append(index if index < 0 else index - 1)  # hidden_states[i] is block i - 1's output
    return tuple(blocks) if isinstance(value, (list, tuple)) else blocks[0]


def vision_config(hf, directory: Path) -> VisionConfig:
    """Our VisionConfig for the checkpoint's CLIP or SigLIP vision tower and image processor.

    Raises:
        VlmError: another tower, or one that cannot be built exactly.
    """
    vision = hf.vision_config
    if vision.model_type not in SUPPORTED_VISION_TYPES:
        raise VlmError(
            f"{directory}: vision tower {vision.model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_VISION_TYPES)}"
        )
    strategy = hf.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise VlmError(f"{directory}: unknown vision_feature_select_strategy {strategy!r}")
    prep = preprocessing(directory, vision.image_size)
    source = f"{directory} (Hugging Face LLaVA)"
    layer = feature_layers(hf.vision_feature_layer, vision.num_hidden_layers)
    settings = {"layer": layer, "crop": prep["crop"], "pad_to_square": prep["pad_to_square"]}
    if vision.model_type == "siglip_vision_model":
        if strategy != "full" or vision.hidden_act != "gelu_pytorch_tanh":
            raise VlmError(
                f"{directory}: SigLIP with select strategy {strategy!r} and hidden_act {vision.hidden_act!r} is not "
                'supported; supported: "full" (SigLIP has no class token to drop) and gelu_pytorch_tanh'
            )
        siglip = SiglipConfig(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            width=vision.hidden_size,
            layers=vision.num_hidden_layers,
            heads=vision.num_attention_heads,
            mlp_width=vision.intermediate_size,
            eps=vision.layer_norm_eps,
            image_mean=prep["mean"],
            image_std=prep["std"],
            source=source,
        )
        return VisionConfig(siglip=siglip, **settings)
    if vision.hidden_act not in ("gelu", "quick_gelu") or vision.layer_norm_eps != 1e-5:
        raise VlmError(
            f"{directory}: CLIP with hidden_act {vision.hidden_act!r} and layer_norm_eps {vision.layer_norm_eps} "
            "has no open_clip form; supported: gelu or quick_gelu with eps 1e-5"
        )
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
    clip = ClipConfig(model_cfg=model_cfg, image_mean=prep["mean"], image_std=prep["std"], source=source)
    return VisionConfig(clip=clip, keep_cls=strategy == "full", **settings)


def projector_from_hf(hf, state: dict[str, torch.Tensor], directory: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(our projector name, its state dict) from `multi_modal_projector.linear_1/2`: an activation
    between is "mlp2x_ACT"; an identity activation with an identity linear_2 (our export of
    "linear") is "linear". With `multimodal_projector_bias` false there are no biases.

    Raises:
        VlmError: another activation, or missing or unexpected projector weights.
    """
    names = ("weight", "bias") if hf.multimodal_projector_bias else ("weight",)
    expected = {f"{PROJECTOR_PREFIX}linear_{i}.{name}" for i in (1, 2) for name in names}
    unexpected = sorted(k for k in state if k.startswith(PROJECTOR_PREFIX) and k not in expected)
    if unexpected:
        raise VlmError(f"{directory}: unexpected projector weights {unexpected[:3]}; not a LLaVA projector")
    try:
        first = {name: state[f"{PROJECTOR_PREFIX}linear_1.{name}"] for name in names}
        second = {name: state[f"{PROJECTOR_PREFIX}linear_2.{name}"] for name in names}
    except KeyError as e:
        raise VlmError(f"{directory}: missing projector weight {e}; the checkpoint is damaged") from None
    act = hf.projector_hidden_act
    weight = second["weight"]
    identity = weight.shape[0] == weight.shape[1] and torch.equal(
        weight, torch.eye(weight.shape[0], dtype=weight.dtype)
    )
    if act == "linear" and identity and ("bias" not in second or not second["bias"].any()):
        return "linear", first
    if act in HF_ACTIVATIONS:
        return f"mlp2x_{HF_ACTIVATIONS[act]}", {
            **{f"0.{k}": v for k, v in first.items()},
            **{f"2.{k}": v for k, v in second.items()},
        }
    raise VlmError(
        f"{directory}: projector activation {act!r} is not supported; supported: {', '.join(HF_ACTIVATIONS)} "
        "(and linear with an identity linear_2)"
    )


def vision_state(vision: VisionConfig, state: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's vision tensors (hub layout) under our `vision.visual.*` names."""
    if vision.siglip is not None:
        below = {k.removeprefix(VISION_PREFIX): v for k, v in state.items() if k.startswith(VISION_PREFIX)}
        mapped = siglip_from_hf(below)
    else:
        mapped = vision_from_hf(state)
    return {f"vision.visual.{key}": tensor for key, tensor in mapped.items()}


def tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub-layout key, tensor as stored) for every tensor of the checkpoint, one at a time.

    Raises:
        VlmError: a missing shard (named) or a damaged safetensors file.
    """
    for path in checkpoint_files(directory):
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    yield hub_layout(key), f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise VlmError(f"{path}: not a readable safetensors file ({e}); download it again") from None


def load_weights(model, hf, directory: Path) -> None:
    """Copy the checkpoint into `model` (whose projector name is already the checkpoint's),
    each LM tensor as it is read; the vision and projector tensors (a small part) are gathered
    first to be renamed. Only UNUSED_WEIGHTS (zeroed) and tied names may be left unfilled.

    Raises:
        VlmError: missing, unexpected or misshapen weights, or a damaged file.
    """
    targets = model.state_dict(keep_vars=True)
    filled, gathered, unexpected = set(), {}, []

    def fill(name: str, tensor: torch.Tensor) -> None:
        target = targets.get(name)
        if target is None:
            unexpected.append(name)
        elif target.shape != tensor.shape:
            raise VlmError(f"{directory}: weights do not fit ({name}: {tuple(tensor.shape)} for {tuple(target.shape)})")
        else:
            target.data.copy_(tensor)
            filled.add(name)

    with torch.no_grad():
        for key, tensor in tensors(directory):
            if key.startswith(LM_PREFIX):
                fill("lm." + key.removeprefix(LM_PREFIX), tensor)
            elif key.startswith((VISION_PREFIX, PROJECTOR_PREFIX)):
                gathered[key] = tensor
            else:
                raise VlmError(f"{directory}: unexpected weight {key!r}; not a LLaVA checkpoint this loader knows")
        _, projector_state = projector_from_hf(hf, gathered, directory)
        for name, tensor in projector_state.items():
            fill(f"projector.{name}", tensor)
        for name, tensor in vision_state(model.config.vision, gathered, directory).items():
            fill(name, tensor)
        if model.config.vision.clip is not None:
            model.vision.visual.proj.zero_()
    missing = [k for k in targets if k not in filled and k not in UNUSED_WEIGHTS and k not in tied_names(model)]
    if missing or unexpected:
        raise VlmError(f"{directory}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are created in `dtype` (the vision tower and projector)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def tied_names(module: torch.nn.Module) -> set[str]:
    """Names of tensors that share storage with an earlier name (tied embeddings)."""
    seen, tied = set(), set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.add(tensor.data_ptr())
    return tied


def projector_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's `multi_modal_projector.*` tensors (read alone: they decide the projector's kind)."""
    found = {}
    for path in checkpoint_files(directory):
        try:
            with safe_open(str(path), "pt") as f:
                found.update({key: f.get_tensor(key) for key in f.keys() if key.startswith(PROJECTOR_PREFIX)})
        except (SafetensorError, OSError) as e:
            raise VlmError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    return found


def chat_template(directory: Path) -> str | None:
    """The processor's Jinja chat template (chat_template.jinja, chat_template.json or
    processor_config.json), None when the checkpoint has none."""
    for name in TEMPLATE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text()
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (ValueError, AttributeError):
            raise VlmError(f"{path}: not a JSON object; fetch it again") from None
        if isinstance(template, str):
            return template
    return None


def tokenizer_for(hf, directory: Path):
    """The checkpoint's tokenizer, as shipped; its <image> must be the config's image token.

    Raises:
        VlmError: unreadable, or an image token that differs from the config's.
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


def load_hf_llava(directory: str | Path, *, dtype: torch.dtype = torch.float32):
    """A Hugging Face LLaVA checkpoint directory as our LlavaModel computing in `dtype`, in eval mode.

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
    check_memory(directory, dtype)
    vision = vision_config(hf, directory)
    projector, _ = projector_from_hf(hf, projector_tensors(directory), directory)
    tokenizer = tokenizer_for(hf, directory)
    text = hf.text_config.to_dict()
    config = LlavaConfig(
        vision=vision,
        lm=text,
        projector=projector,
        projector_bias=bool(hf.multimodal_projector_bias),
        max_length=text.get("max_position_embeddings", 2048),
        stop_token_ids=stop_token_ids(directory),
        chat_template=chat_template(directory),
    )
    with hub.config_errors(directory, "llava"), no_init_weights():  # every weight is loaded next
        lm = lm_from_config(text, dtype=dtype)
    lm.tie_weights()  # skipped with the initialisation; ties the embeddings where the config says so
    with hub.config_errors(directory, "llava"), no_init_weights(), default_dtype(dtype):  # no float32 tower
        model = LlavaModel(config=config, tokenizer=tokenizer, lm=lm).to(dtype)
    load_weights(model, hf, directory)
    return model.eval()
