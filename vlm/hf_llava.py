"""Our LLaVA models as Hugging Face LLaVA checkpoints (`LlavaForConditionalGeneration`).

    export_hf_llava(load_vlm("llava-easyvqa"), "out/")   # vlmstack export M --format hf-llava --out DIR

The checkpoint is written in the hub layout that every transformers version reads:
`vision_tower.vision_model.*` (a CLIPVisionModel), `multi_modal_projector.linear_1/2`,
`language_model.*` (the causal LM's own keys). The open_clip ViT maps onto CLIP's blocks
(in_proj split into q/k/v; visual.proj, unused by patch features, is dropped); our layer
-2 without CLS is `vision_feature_layer=-2` with select strategy "default". A "linear"
projector becomes linear_1 with an identity activation and an identity linear_2.

Beside the weights: config.json, generation_config.json (eos, pad), the tokenizer with
left padding recorded (batched answers disagree otherwise), the chat template of
vlm/chat_template.py, and a CLIPImageProcessor doing what our ImageTransform does.
The key maps are tables read both ways, so a loader of HF checkpoints reuses them.

Preprocessing: `AutoProcessor.from_pretrained(DIR, backend="pil")` gives our pixels exactly;
transformers 5's default torchvision backend differs by up to one 8-bit level.
"""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlavaConfig, LlavaProcessor

from vlm import hub
from vlm.atomic import write_json
from vlm.errors import VlmError
from vlm.lm import IMAGE_TOKEN

VISION_PREFIX = "vision_tower.vision_model."
PROJECTOR_PREFIX = "multi_modal_projector."
LM_PREFIX = "language_model."
WEIGHTS_FILE = "model.safetensors"
EXPORTABLE_PROJECTORS = {"linear": "linear", "mlp2x_gelu": "gelu"}  # ours -> projector_hidden_act

# open_clip VisionTransformer key -> CLIPVisionModel key (below vision_model.)
VISION_KEYS = {
    "class_embedding": "embeddings.class_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
# open_clip block key -> CLIP encoder layer key (in_proj_weight/bias are split into q/k/v)
BLOCK_KEYS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
QKV = ("q_proj", "k_proj", "v_proj")
BLOCK_PREFIX, LAYER_PREFIX = "transformer.resblocks.", "encoder.layers."
DROPPED_VISION_KEYS = ("proj",)  # CLIP's image projection: not part of the patch features

# The chat template of vlm/chat_template.py in Jinja, for string or list-of-parts content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') | trim }}"
    "{% endif %}{{ eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('roles must be user or assistant, not ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def vision_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ViT state dict -> CLIPVisionModel keys in the hub layout (`vision_tower.vision_model.*`).

    Raises:
        VlmError: the tower has weights CLIP has no place for (layer scale, attention pooling, ...).
    """
    out = {}
    for key, tensor in state.items():
        if key in DROPPED_VISION_KEYS:
            continue
        if key in VISION_KEYS:
            out[VISION_PREFIX + VISION_KEYS[key]] = tensor
            continue
        block, _, rest = key.removeprefix(BLOCK_PREFIX).partition(".")
        layer = VISION_PREFIX + LAYER_PREFIX + block + ".self_attn."
        if not key.startswith(BLOCK_PREFIX):
            raise VlmError(
                f"cannot export the vision tower: CLIP has no place for its {key!r}; use a plain open_clip ViT"
            )
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rpartition("_")[2]  # weight | bias
            for name, part in zip(QKV, tensor.chunk(3, dim=0)):  # (3W, ...) -> 3 x (W, ...)
                out[f"{layer}{name}.{kind}"] = part
        elif rest in BLOCK_KEYS:
            out[VISION_PREFIX + LAYER_PREFIX + block + "." + BLOCK_KEYS[rest]] = tensor
        else:
            raise VlmError(
                f"cannot export the vision tower: CLIP has no place for its {key!r}; use a plain open_clip ViT"
            )
    return out


def vision_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `vision_to_hf` (without the dropped keys): hub-layout CLIP vision keys ->
    open_clip ViT keys; q/k/v are concatenated into in_proj. Keys outside the vision tower are ignored.

    Raises:
        VlmError: a vision key with no open_clip counterpart.
    """
    top = {hf: ours for ours, hf in VISION_KEYS.items()}
    block_keys = {hf: ours for ours, hf in BLOCK_KEYS.items()}
    out, qkv = {}, {}
    for key, tensor in state.items():
        if not key.startswith(VISION_PREFIX):
            continue
        name = key.removeprefix(VISION_PREFIX)
        if name in top:
            out[top[name]] = tensor
            continue
        block, _, rest = name.removeprefix(LAYER_PREFIX).partition(".")
        proj, _, kind = rest.removeprefix("self_attn.").partition(".")
        if name.startswith(LAYER_PREFIX) and rest in block_keys:
            out[f"{BLOCK_PREFIX}{block}.{block_keys[rest]}"] = tensor
        elif name.startswith(LAYER_PREFIX) and proj in QKV and kind in ("weight", "bias"):
            qkv[(block, kind, proj)] = tensor
        else:
            raise VlmError(f"unexpected vision weight {key!r}: not a CLIP vision tower key")
    for block, kind in sorted({(b, k) for b, k, _ in qkv}):
        parts = [qkv.get((block, kind, proj)) for proj in QKV]
        if any(p is None for p in parts):
            raise VlmError(f"vision layer {block}: q/k/v {kind} incomplete; the checkpoint is damaged")
        out[f"{BLOCK_PREFIX}{block}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)  # 3 x (W, ...) -> (3W, ...)
    return out


def projector_to_hf(kind: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our projector's state dict -> `multi_modal_projector.linear_1/2` (identity linear_2 for "linear")."""
    if kind == "linear":
        width = state["weight"].shape[0]
        second = {"weight": torch.eye(width, dtype=state["weight"].dtype), "bias": torch.zeros_like(state["bias"])}
        first = state
    else:  # mlp2x_gelu: Sequential(Linear, GELU, Linear)
        first = {"weight": state["0.weight"], "bias": state["0.bias"]}
        second = {"weight": state["2.weight"], "bias": state["2.bias"]}
    out = {}
    for layer, params in (("linear_1", first), ("linear_2", second)):
        for name, tensor in params.items():
            out[f"{PROJECTOR_PREFIX}{layer}.{name}"] = tensor
    return out


def check_exportable(model) -> None:
    """Raises VlmError (one line) for a LLaVA model the HF format cannot express."""
    if model.config.projector not in EXPORTABLE_PROJECTORS:
        raise VlmError(
            f"cannot export projector {model.config.projector!r} to hf-llava; "
            f"only {' and '.join(EXPORTABLE_PROJECTORS)} projectors map onto it"
        )
    vision = model.config.vision
    if vision.clip is None or len(model.vision.layer_indices) != 1 or vision.keep_cls or vision.ln_post:
        raise VlmError(
            "cannot export this vision tower to hf-llava: only a CLIP tower read at one layer, "
            "without its class token or final layer norm, is exported"
        )
    if not vision.crop or vision.pad_to_square or not model.config.projector_bias:
        raise VlmError("cannot export to hf-llava: only centre-cropped images and a projector with bias are exported")
    visual = model.vision.visual
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise VlmError("cannot export a vision tower with non-square images or patches to hf-llava")


def vision_config(model) -> CLIPVisionConfig:
    """The CLIPVisionConfig of the model's open_clip ViT."""
    visual, clip_cfg = model.vision.visual, model.config.vision.clip.model_cfg
    block = visual.transformer.resblocks[0]
    return CLIPVisionConfig(
        hidden_size=visual.transformer.width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act="quick_gelu" if clip_cfg.get("quick_gelu", False) else "gelu",
        layer_norm_eps=visual.ln_pre.eps,
        projection_dim=clip_cfg["embed_dim"],
    )


def hf_config(model) -> LlavaConfig:
    """The LlavaConfig that describes `model` (a vlm.llava.LlavaModel)."""
    vision = vision_config(model)
    depth = vision.num_hidden_layers
    return LlavaConfig(
        vision_config=vision,
        text_config=copy.deepcopy(model.lm.config),  # LlavaConfig resets the attention choice of what it is given
        image_token_index=model.image_token_id,
        projector_hidden_act=EXPORTABLE_PROJECTORS[model.config.projector],
        multimodal_projector_bias=True,
        vision_feature_layer=model.vision.layer_indices[0] - depth,  # block i's output is hidden_states[i + 1]
        vision_feature_select_strategy="default",  # the CLS token dropped
        image_seq_length=model.image_token_count,
        tie_word_embeddings=bool(getattr(model.lm.config, "tie_word_embeddings", False)),
    )


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, hub-layout keys, contiguous and unshared (tied LM weights copied)."""
    state = vision_to_hf(model.vision.visual.state_dict())
    state.update(projector_to_hf(model.config.projector, model.projector.state_dict()))
    state.update({LM_PREFIX + key: tensor for key, tensor in model.lm.state_dict().items()})
    return {key: tensor.detach().clone().contiguous() for key, tensor in state.items()}


def image_processor(model) -> CLIPImageProcessor:
    """Our ImageTransform as a CLIPImageProcessor: shorter side to `size` (bicubic), centre crop, mean/std."""
    transform = model.transform
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": transform.size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": transform.size, "width": transform.size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(transform.mean),
        image_std=list(transform.std),
        do_convert_rgb=True,
    )


def processor(model) -> LlavaProcessor:
    """Image processor, the model's tokenizer (left padding, our chat template) and image token settings."""
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    return LlavaProcessor(
        image_processor=image_processor(model),
        tokenizer=tokenizer,
        patch_size=model.vision.visual.patch_size[0],
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def portable_tokenizer_config(path: Path) -> None:
    """Make tokenizer_config.json readable by transformers 4 and 5 alike, with left padding recorded
    (save_pretrained leaves it out, and a right-padded batch then generates after its padding):
    transformers 5's generic class name and list of extra special tokens become 4's names."""
    settings = json.loads(path.read_text())
    settings["padding_side"] = "left"
    settings["model_input_names"] = ["input_ids", "attention_mask"]  # not token_type_ids, which generate refuses
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(settings.get("extra_special_tokens"), list):
        settings["additional_special_tokens"] = settings.pop("extra_special_tokens")
    write_json(path, settings)


def generation_config(model) -> GenerationConfig:
    """Greedy decoding that stops where ours does (eos or <|endofchunk|>) and pads with our pad token."""
    tokenizer = model.tokenizer
    return GenerationConfig(
        eos_token_id=list(model.stop_ids()),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
    )


def export_hf_llava(model, out: str | Path) -> Path:
    """Write `model` (a vlm.llava.LlavaModel) to `out` as a Hugging Face LLaVA checkpoint.

    The directory appears complete or not at all (written beside it, then renamed).
    Returns: the directory.
    Raises:
        VlmError: the projector or vision tower has no HF LLaVA form, or `out` already exists.
    """
    out = Path(out)
    if out.exists():
        raise VlmError(f"{out} already exists; choose a new --out directory or remove it")
    check_exportable(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_config(model).save_pretrained(tmp)
        generation_config(model).save_pretrained(tmp)
        processor(model).save_pretrained(tmp)
        image_processor(model).save_pretrained(tmp)  # preprocessor_config.json, where transformers 4 looks
        portable_tokenizer_config(tmp / "tokenizer_config.json")
        save_file(hf_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_model(spec: str, out: str | Path) -> Path:
    """`vlmstack export SPEC --format hf-llava --out OUT`: load a LLaVA model by shipped name or
    directory and export it. Raises VlmError for a model of another kind."""
    from vlm.load import load_vlm

    directory = hub.resolve_dir(spec)
    kind = hub.model_kind(directory) if directory else None
    if kind not in (None, "llava"):
        raise VlmError(f"{spec!r} is a {kind} model; hf-llava export takes LLaVA models (e.g. llava-easyvqa)")
    return export_hf_llava(load_vlm(spec), out)
