"""SigLIP image towers (llava-interleave's vision encoder) as timm ViTs, and their Hugging Face keys.

A SigLIP ViT differs from CLIP's in its parts, not its idea: the patch embedding has a bias,
there is no class token and no layer norm before the blocks, the MLP uses tanh-approximated
GELU, layer norms use eps 1e-6, and the pooled output comes from an attention-pooling head,
which patch features never use (it is not built). The blocks are pre-norm like CLIP's.

    visual = build_siglip(SiglipConfig(image_size=384, patch_size=14, width=1152, layers=27,
                                       heads=16, mlp_width=4304))
    visual.load_state_dict(siglip_from_hf(hf_vision_tensors))   # keys below `vision_model.`
"""

from dataclasses import dataclass, field
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vlm.schema import schema_field

HEAD_PREFIX = "head."  # the attention-pooling head: unused by patch features
# Hugging Face SiglipVisionTransformer key (below vision_model.) -> timm VisionTransformer key
SIGLIP_KEYS = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
POSITION_KEY = ("embeddings.position_embedding.weight", "pos_embed")  # (N, W) -> (1, N, W)
LAYER_KEYS = {  # per block: encoder.layers.{i}. -> blocks.{i}.
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # -> attn.qkv, concatenated


@dataclass
class SiglipConfig:
    image_size: int  # square input side in pixels
    patch_size: int
    width: int  # token width
    layers: int  # transformer blocks
    heads: int  # attention heads (width / heads per head)
    mlp_width: int  # hidden width of each block's MLP
    eps: float = 1e-6  # layer norm epsilon
    image_mean: tuple = (0.5, 0.5, 0.5)  # per-channel normalisation the weights were trained with
    image_std: tuple = (0.5, 0.5, 0.5)
    source: str = ""  # where the architecture came from
    kind: str = field(default="siglip", init=False)
    schema_version: int = schema_field()

    def __post_init__(self):
        # image_size need not be a multiple of patch_size (so400m: 384 / 14 -> 27 x 27 patches, the rest unused)
        if self.image_size < self.patch_size or self.width % self.heads:
            raise ValueError(
                f"SigLIP image_size {self.image_size} must be at least patch_size {self.patch_size}, "
                f"width {self.width} a multiple of heads {self.heads}"
            )
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)


def build_siglip(config: SiglipConfig) -> VisionTransformer:
    """A SigLIP ViT (patch embedding, blocks, final norm; no pooling head), weights not initialised."""
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.layers,
        num_heads=config.heads,
        mlp_ratio=(config.mlp_width + 0.5) / config.width,  # timm truncates width * ratio
        class_token=False,
        global_pool="",
        num_classes=0,
        act_layer=partial(nn.GELU, approximate="tanh"),
        norm_layer=partial(nn.LayerNorm, eps=config.eps),
        weight_init="skip",
    )


def siglip_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF SigLIP vision tensors (keys below `vision_model.`, head.* ignored) -> timm keys.
    Keys this map does not know are passed through unchanged, for the loader to refuse."""
    ours = {}
    for key, tensor in state.items():
        if key.startswith(HEAD_PREFIX):
            continue
        if key in SIGLIP_KEYS:
            ours[SIGLIP_KEYS[key]] = tensor
        elif key == POSITION_KEY[0]:
            ours[POSITION_KEY[1]] = tensor[None]
        elif key.startswith("encoder.layers."):
            index, rest = key.removeprefix("encoder.layers.").split(".", 1)
            part, name = rest.rsplit(".", 1)
            if part in LAYER_KEYS:
                ours[f"blocks.{index}.{LAYER_KEYS[part]}.{name}"] = tensor
            elif part == QKV[0]:
                parts = [state.get(f"encoder.layers.{index}.{p}.{name}") for p in QKV]
                if all(p is not None for p in parts):
                    ours[f"blocks.{index}.attn.qkv.{name}"] = torch.cat(parts)
            elif part not in QKV:
                ours[key] = tensor
        else:
            ours[key] = tensor
    return ours
