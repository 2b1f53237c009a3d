"""Flamingo-style visual language model: a frozen causal LM whose decoder layers get gated
cross-attention blocks reading Perceiver-Resampler latents of the images.

    vqa = load_vlm("flamingo-easyvqa")
    vqa.answer(image, "what color is the shape?")
    vqa.chat([{"role": "user", "content": "<image>\\n<image>\\nare both shapes the same color?"}], [a, b])

An image is one <image> token in the text; each token attends to the latents of the
most recent image before it (vlm/xattn.py). Any number of images may be interleaved.
Image latents are computed once per image and reused across decode steps and turns.
A saved model is one directory: config.json, model.safetensors, tokenizer files.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from vlm.chat_template import Encoded
from vlm.generation import Prompt
from vlm.lm import IMAGE_TOKEN, check_max_length, decoder_layers
from vlm.resampler import PerceiverResampler, ResamplerConfig
from vlm.schema import schema_field
from vlm.vision import VisionConfig, VisionTower
from vlm.vision_language import VisionLanguageModel
from vlm.xattn import GatedCrossAttentionBlock, MediaState, attending_to, media_index, wrap_layers


@dataclass
class FlamingoArchitecture:
    """What a recipe chooses of a Flamingo model (recipes nest it as "model")."""

    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    cross_attn_every: int = 1  # a gated cross-attention block before every Nth decoder layer
    xattn_heads: int = 4
    xattn_head_dim: int = 64
    max_length: int = 256  # tokens per sequence (an image is one token)


@dataclass(kw_only=True)
class FlamingoConfig(FlamingoArchitecture):
    vision: VisionConfig
    lm: dict  # the language model's Hugging Face config
    kind: str = field(default="flamingo", init=False)
    schema_version: int = schema_field()


@dataclass
class FlamingoContext:
    """Per-prompt state for generation: the images' latents and which image each token follows."""

    latents: torch.Tensor  # (B, M, R, D)
    media_index: torch.Tensor  # (B, T) for the prompt tokens

    def index_for(self, start: int, length: int) -> torch.Tensor:
        """(B, length) media index of tokens start..start+length; generated tokens follow
        the prompt's last image."""
        prompt_length = self.media_index.shape[1]
        at = torch.arange(start, start + length)
        inside = self.media_index[:, at.clamp(max=prompt_length - 1)]
        return torch.where(at[None] < prompt_length, inside, self.media_index[:, -1:])


class FlamingoModel(VisionLanguageModel):
    config_class = FlamingoConfig

    def __init__(
        self, *, config: FlamingoConfig, tokenizer, vision: VisionTower | None = None, lm: nn.Module | None = None
    ):
        super().__init__(config=config, tokenizer=tokenizer, vision=vision, lm=lm)
        self.resampler = PerceiverResampler(dim=self.vision.width, config=config.resampler)

        def make_block() -> GatedCrossAttentionBlock:
            return GatedCrossAttentionBlock(
                dim=self.hidden_size,
                media_dim=self.vision.width,
                heads=config.xattn_heads,
                head_dim=config.xattn_head_dim,
            )

        self._wrapped = wrap_layers(decoder_layers(self.lm), every=config.cross_attn_every, make_block=make_block)

    @property
    def image_token_count(self) -> int:
        return 1

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, S, S) -> (M, R, D) resampled latents (one frame per image)."""
        return self.resampler(self.vision(pixels)[:, None])

    def expand(self, encoded: Encoded) -> tuple[list[int], list[int]]:
        return encoded.ids, encoded.labels  # an image is its one <image> token

    def batch_latents(self, per_image: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
        """Images' (R, D) latents in reading order -> (B, M, R, D), zero-padded per row (at
        least one slot, so text-only rows still run the blocks' feed-forwards)."""
        r, d = self.config.resampler.num_latents, self.vision.width
        out = torch.zeros(len(counts), max(1, max(counts, default=0)), r, d, dtype=self.lm.dtype)
        start = 0
        for row, count in enumerate(counts):
            if count:
                out[row, :count] = torch.stack(per_image[start : start + count])
            start += count
        if start != len(per_image):
            raise ValueError(f"the text has {start} {IMAGE_TOKEN} placeholders but {len(per_image)} images were given")
        return out

    def forward(self, *, input_ids, attention_mask, pixels=None, labels=None):
        """Training/scoring pass; pixels (M, 3, S, S) are the batch's images in reading order.
        Returns the LM's CausalLMOutputWithPast (loss when labels are given)."""
        latents = list(self.encode_images(pixels)) if pixels is not None and len(pixels) else []
        counts = (input_ids == self.image_token_id).sum(-1).tolist()
        with attending_to(MediaState(self.batch_latents(latents, counts), media_index(input_ids, self.image_token_id))):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def build_prompt(self, input_ids, attention_mask, features, counts) -> Prompt:
        """Prompt embeddings, with the images' latents and media index as the context."""
        context = FlamingoContext(self.batch_latents(features, counts), media_index(input_ids, self.image_token_id))
        return Prompt(self.token_embeddings(input_ids), attention_mask, context)

    def media(self, prompt: Prompt, start: int, length: int):
        """LM calls in this context cross-attend to the prompt's images; per thread, so
        concurrent calls on one model never see each other's images."""
        return attending_to(MediaState(prompt.context.latents, prompt.context.index_for(start, length)))


def build_flamingo(*, vision: VisionTower, lm: nn.Module, tokenizer, **options) -> FlamingoModel:
    """A new Flamingo model around a pretrained vision tower and LM; resampler and
    cross-attention blocks are random, gates are 0 (the LM is unchanged).
    `options`: FlamingoConfig fields (resampler as a ResamplerConfig)."""
    config = FlamingoConfig(vision=vision.config, lm=lm.config.to_dict(), **options)
    check_max_length(lm, config.max_length)
    return FlamingoModel(config=config, tokenizer=tokenizer, vision=vision, lm=lm)
