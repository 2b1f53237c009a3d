"""Flamingo's gated cross-attention dense blocks, and wrapping them into any HF causal LM.

Each block lets text attend to visual latents, then applies a feed-forward; both are
scaled by tanh(gate) with gates starting at 0, so at initialisation the wrapped, frozen LM
computes exactly what it did before.

Media-aware masking: `media_index[b, t]` is the 1-based number of the most recent
<image> at or before token t (0 before the first image). A token attends only to that
image's latents; tokens with index 0 get exactly zero attention output.
"""

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlm.resampler import feed_forward


class MaskedCrossAttention(nn.Module):
    def __init__(self, *, dim: int, media_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_index: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), media (B, M, R, Dm) latents, media_index (B, T) -> (B, T, D)."""
        batch, images, latents = media.shape[:3]
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)  # (B, M*R, inner)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        latent_image = torch.arange(1, images + 1).repeat_interleave(latents)  # (M*R,) 1-based image of each latent
        allowed = media_index[:, :, None] == latent_image[None, None]  # (B, T, M*R)
        has_image = media_index > 0
        # Rows with no image would attend to nothing (NaN); let them attend anywhere, then zero them.
        allowed = allowed | ~has_image[..., None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (B, h, T, d)
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return out * has_image[..., None].to(out.dtype)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, *, dim: int, media_dim: int, heads: int = 4, head_dim: int = 64, ff_mult: int = 4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, media_dim=media_dim, heads=heads, head_dim=head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_index: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, media, media_index) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


@dataclass
class MediaState:
    """What the wrapped layers read during one LM call."""

    latents: torch.Tensor  # (B, M, R, Dm), images padded to the batch's largest M
    media_index: torch.Tensor  # (B, T) for the tokens of this call


# The media of the LM call running in this thread (or asyncio task). A context variable,
# not an attribute of the shared layers: two users' calls on one model at the same time
# each see their own images.
_current_media: ContextVar[MediaState | None] = ContextVar("flamingo_media", default=None)


@contextlib.contextmanager
def attending_to(state: MediaState):
    """Wrapped layers cross-attend to `state` for LM calls made inside this block (in
    this thread or task only)."""
    token = _current_media.set(state)
    try:
        yield
    finally:
        _current_media.reset(token)


class FlamingoLayer(nn.Module):
    """A decoder layer with a gated cross-attention block in front (None: plain layer).

    The block reads the media set by `attending_to` around the LM call; outside such a
    block the layer is the bare decoder layer.
    """

    def __init__(self, *, decoder_layer: nn.Module, xattn: GatedCrossAttentionBlock | None):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.xattn = xattn

    def forward(self, *args, **kwargs):
        media = _current_media.get()
        if self.xattn is not None and media is not None:
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = self.xattn(kwargs["hidden_states"], media.latents, media.media_index)
            else:
                args = (self.xattn(args[0], media.latents, media.media_index), *args[1:])
        return self.decoder_layer(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes transformers reads off its layers (e.g. attention_type)
            return getattr(self._modules["decoder_layer"], name)


def wrap_layers(layers: nn.ModuleList, *, every: int, make_block) -> list[FlamingoLayer]:
    """Replace each layer by a FlamingoLayer; layers (i + 1) % every == 0 get a block from
    `make_block()` (OpenFlamingo's placement). Returns the wrappers."""
    wrapped = []
    for i, layer in enumerate(layers):
        wrapper = FlamingoLayer(decoder_layer=layer, xattn=make_block() if (i + 1) % every == 0 else None)
        layers[i] = wrapper
        wrapped.append(wrapper)
    return wrapped


def media_index(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) 1-based index of the latest <image> at or before each token."""
    return (input_ids == image_token_id).long().cumsum(-1)
