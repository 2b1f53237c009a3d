"""Patch features from a ViT, the visual input of both VQA models: an open_clip CLIP ViT
(the models trained here, LLaVA-1.5, OpenFlamingo) or a SigLIP ViT (llava-interleave, vlm/siglip.py).

LLaVA-1.5 reads the patch tokens of the penultimate transformer layer (the last one is
shaped for CLIP's pooled embedding, not for describing regions); `layer` picks any other,
and a tuple of layers gives their tokens side by side (width x number of layers).
The class token (CLIP only) is dropped unless `keep_cls` (Hugging Face LLaVA's select
strategy "full"). The tokens are read as the block leaves them unless `ln_post`: open_clip
>= 2.23 applies its final layer norm to all output tokens, OpenFlamingo (open_clip 2.16) does not.
`crop` and `pad_to_square` say how an image becomes the square input (vlm/images.py).
The tower is frozen by the training recipes, not here.
"""

from dataclasses import dataclass

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from vlm.clip import Clip, ClipConfig
from vlm.errors import VlmError
from vlm.images import ImageTransform
from vlm.siglip import SiglipConfig, build_siglip


@dataclass
class VisionConfig:
    clip: ClipConfig | None = None  # a CLIP whose image tower gives the patch features, or
    siglip: SiglipConfig | None = None  # a SigLIP tower (exactly one of the two)
    layer: int | tuple = -2  # block(s) whose patch tokens are read (-2: the penultimate)
    keep_cls: bool = False  # the class token comes first in the features (HF LLaVA's "full" strategy)
    ln_post: bool = False  # apply the ViT's final layer norm to the tokens read
    crop: bool = True  # shorter side resized then centre-cropped; False: resized to a square
    pad_to_square: bool = False  # padded to a square with the mean colour before resizing

    def __post_init__(self):
        if (self.clip is None) == (self.siglip is None):
            raise ValueError("a vision config names exactly one tower: clip or siglip")
        if self.siglip is not None and self.keep_cls:
            raise ValueError("a SigLIP tower has no class token to keep")
        layers = self.layer if isinstance(self.layer, tuple) else (self.layer,)
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"layer must be a block index or a list of them, not {self.layer!r}")


class VisionTower(nn.Module):
    def __init__(self, *, config: VisionConfig):
        super().__init__()
        self.config = config
        if config.siglip is not None:
            self.visual = build_siglip(config.siglip)
            blocks, self.token_width, self.grid = (
                self.visual.blocks,
                self.visual.embed_dim,
                self.visual.patch_embed.grid_size,
            )
        else:
            self.visual = _clip_visual(config.clip)
            blocks, self.token_width, self.grid = (
                self.visual.transformer.resblocks,
                self.visual.transformer.width,
                self.visual.grid_size,
            )
        self.image_size = config.siglip.image_size if config.siglip else self.visual.image_size[0]
        depth = len(blocks)
        layers = config.layer if isinstance(config.layer, tuple) else (config.layer,)
        for layer in layers:
            if not -depth <= layer < depth:
                raise VlmError(f"vision layer {layer} out of range for a {depth}-layer ViT")
        self.layer_indices = tuple(layer % depth for layer in layers)  # -2 -> the penultimate block

    @classmethod
    def from_clip(cls, clip: Clip, *, layer: int = -2) -> "VisionTower":
        tower = cls(config=VisionConfig(clip=clip.config, layer=layer))
        tower.visual.load_state_dict(clip.model.visual.state_dict())
        return tower

    @property
    def width(self) -> int:
        """Width of a feature token: the ViT's width times the number of layers read."""
        return self.token_width * len(self.layer_indices)

    @property
    def num_patches(self) -> int:
        """Tokens per image in the features: the patches, plus the class token if kept."""
        return self.grid[0] * self.grid[1] + int(self.config.keep_cls)

    @property
    def transform(self) -> ImageTransform:
        tower = self.config.siglip or self.config.clip
        return ImageTransform(
            self.image_size,
            tuple(tower.image_mean),
            tuple(tower.image_std),
            crop=self.config.crop,
            pad_to_square=self.config.pad_to_square,
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_patches, width) tokens of the chosen layers ([CLS] first if
        kept; several layers side by side), through the final layer norm if the config says so."""
        pixels = pixels.to(next(self.visual.parameters()).dtype)  # float32 pixels into a bfloat16 tower
        blocks = sorted(set(self.layer_indices))  # the ViTs return each block once, in order
        if self.config.siglip is not None:
            layers = self.visual.forward_intermediates(
                pixels, indices=blocks, stop_early=True, output_fmt="NLC", intermediates_only=True
            )  # [(B, P, W)] per block
            final_norm = self.visual.norm
        else:
            out = self.visual.forward_intermediates(
                pixels,
                indices=blocks,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
                output_extra_tokens=self.config.keep_cls,
            )
            layers = out["image_intermediates"]  # [(B, P, W)] per block
            if self.config.keep_cls:
                layers = [
                    torch.cat([cls, tokens], dim=1) for cls, tokens in zip(out["image_intermediates_prefix"], layers)
                ]
            final_norm = self.visual.ln_post
        if self.config.ln_post:
            layers = [final_norm(tokens) for tokens in layers]
        by_block = dict(zip(blocks, layers))
        return torch.cat([by_block[i] for i in self.layer_indices], dim=-1)  # (B, P, W x layers)


def _clip_visual(clip_config: ClipConfig) -> VisionTransformer:
    """open_clip's ViT image tower of a CLIP config (weights not loaded)."""
    cfg = clip_config.model_cfg
    vision_cfg = open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"])
    visual = open_clip.model._build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))
    if not isinstance(visual, VisionTransformer):
        raise VlmError(f"{clip_config.source}: patch features need a ViT image tower, not {type(visual).__name__}")
    return visual
