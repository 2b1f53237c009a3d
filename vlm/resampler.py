"""Perceiver Resampler (Flamingo, Alayrac et al. 2022): any number of visual features in,
a fixed number of latent tokens out.

Learned latents (R, D) attend, layer after layer, to the concatenation of the media's
features and themselves (q = latents, kv = [features; latents]), each attention followed
by a feed-forward. A media item may have several frames; a learned time embedding per
frame is added before the frames' patches are pooled together (unless `time_embeddings`
is off, as in OpenFlamingo's released models).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ResamplerConfig:
    depth: int = 2  # attention + feed-forward layers
    heads: int = 2
    head_dim: int = 64
    num_latents: int = 16  # tokens out per media item, whatever the patches in
    max_frames: int = 4  # frames per media item (time embeddings)
    time_embeddings: bool = True  # learned per-frame embeddings; False: none, any frame count (OpenFlamingo)
    ff_mult: int = 4  # feed-forward width, times the feature width


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (B, N, D), latents (B, R, D) -> (B, R, D)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, R, d)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    def __init__(self, *, dim: int, config: ResamplerConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.num_latents, dim) * dim**-0.5)
        self.frame_embeddings = (
            nn.Parameter(torch.zeros(config.max_frames, dim)) if config.time_embeddings else None
        )  # (max_frames, D) time embeddings
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim=dim, heads=config.heads, head_dim=config.head_dim),
                    feed_forward(dim, config.ff_mult),
                ]
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, N, D) features of B media items with F frames of N patches -> (B, R, D)."""
        batch, frames = features.shape[:2]
        if self.frame_embeddings is not None:
            if frames > self.frame_embeddings.shape[0]:
                raise ValueError(
                    f"{frames} frames per media item; this resampler takes at most {self.frame_embeddings.shape[0]}"
                )
            features = features + self.frame_embeddings[:frames, None]
        media = features.flatten(1, 2)  # (B, F*N, D)
        latents = self.latents.expand(batch, -1, -1)
        for attention, ff in self.layers:
            latents = attention(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
