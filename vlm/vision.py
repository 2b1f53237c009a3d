"""Patch features from a CLIP ViT, the visual input of both VQA models.

LLaVA-1.5 reads the patch tokens of the penultimate transformer layer (the last one is
shaped for CLIP's pooled embedding, not for describing regions); `layer` picks any other.
The class token is dropped unless `keep_cls` (Hugging Face LLaVA's select strategy "full").
The tokens are read as the block leaves them unless `ln_post`: open_clip >= 2.23 applies
its final layer norm to all output tokens, OpenFlamingo (open_clip 2.16) does not.
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


@dataclass
class VisionConfig:
    clip: ClipConfig  # the CLIP whose image tower gives the patch features
    layer: int = -2  # transformer block whose patch tokens are read (-2: the penultimate)
    keep_cls: bool = False  # the class token comes first in the features (HF LLaVA's "full" strategy)
    ln_post: bool = False  # apply the ViT's final layer norm (ln_post) to the tokens read


class VisionTower(nn.Module):
    def __init__(self, *, config: VisionConfig):
        super().__init__()
        self.config = config
        clip_config, layer = config.clip, config.layer
        cfg = clip_config.model_cfg
        vision_cfg = open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"])
        self.visual = open_clip.model._build_vision_tower(
            cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False)
        )
        if not isinstance(self.visual, VisionTransformer):
            raise VlmError(
                f"{clip_config.source}: patch features need a ViT image tower, not {type(self.visual).__name__}"
            )
        depth = len(self.visual.transformer.resblocks)
        if not -depth <= layer < depth:
            raise VlmError(f"vision layer {layer} out of range for a {depth}-layer ViT")
        self.layer_index = layer % depth  # -2 -> the penultimate block

    @classmethod
    def from_clip(cls, clip: Clip, *, layer: int = -2) -> "VisionTower":
        tower = cls(config=VisionConfig(clip=clip.config, layer=layer))
        tower.visual.load_state_dict(clip.model.visual.state_dict())
        return tower

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def num_patches(self) -> int:
        """Tokens per image in the features: the patches, plus the class token if kept."""
        height, width = self.visual.grid_size
        return height * width + int(self.config.keep_cls)

    @property
    def transform(self) -> ImageTransform:
        size = self.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return ImageTransform(size, tuple(self.config.clip.image_mean), tuple(self.config.clip.image_std))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_patches, width) tokens of the chosen layer ([CLS] first if
        kept), through ln_post if the config says so."""
        out = self.visual.forward_intermediates(
            pixels,
            indices=[self.layer_index],
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
            output_extra_tokens=self.config.keep_cls,
        )
        tokens = out["image_intermediates"][0]  # (B, P, W)
        if self.config.keep_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)  # (B, 1 + P, W)
        return self.visual.ln_post(tokens) if self.config.ln_post else tokens
