"""LLaVA-style visual language model: CLIP patch tokens -> projector -> spliced into a
causal LM's input embeddings in place of the prompt's <image> token.

    vqa = load_vlm("llava-easyvqa")
    vqa.answer(image, "what color is the shape?")

Each <image> in the prompt is expanded to `num_patches` image tokens when tokenised;
their embeddings are replaced, in one vectorised masked_scatter, by the projected
patch features (after checking the counts match). A saved model is one directory:
config.json, model.safetensors (vision tower, projector and LM) and tokenizer files.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from vlm.chat_template import IGNORE_INDEX, Encoded
from vlm.generation import Prompt
from vlm.lm import IMAGE_TOKEN, check_max_length
from vlm.projector import build_projector
from vlm.schema import schema_field
from vlm.vision import VisionConfig, VisionTower
from vlm.vision_language import VisionLanguageModel


@dataclass
class LlavaArchitecture:
    """What a recipe chooses of a LLaVA model (recipes nest it as "model")."""

    projector: str = "mlp2x_gelu"  # see vlm/projector.py
    max_length: int = 512  # tokens per sequence, image tokens included


@dataclass(kw_only=True)
class LlavaConfig(LlavaArchitecture):
    vision: VisionConfig
    lm: dict  # the language model's Hugging Face config
    stop_token_ids: tuple = ()  # more tokens that end an answer (a Hugging Face checkpoint's generation eos)
    projector_bias: bool = True  # the projector's linear layers have biases
    chat_template: str | None = None  # a checkpoint's own Jinja chat template (None: vlm/chat_template.py's)
    kind: str = field(default="llava", init=False)
    schema_version: int = schema_field()


class LlavaModel(VisionLanguageModel):
    config_class = LlavaConfig
    media_tokens = (IMAGE_TOKEN,)  # a checkpoint's tokenizer is used as shipped: nothing else is added

    def __init__(
        self, *, config: LlavaConfig, tokenizer, vision: VisionTower | None = None, lm: nn.Module | None = None
    ):
        super().__init__(config=config, tokenizer=tokenizer, vision=vision, lm=lm)
        self.projector = build_projector(
            config.projector, self.vision.width, self.hidden_size, bias=config.projector_bias
        )

    @property
    def image_token_count(self) -> int:
        return self.vision.num_patches

    def stop_ids(self) -> tuple[int, ...]:
        """The tokenizer's eos, <|endofchunk|> and the config's stop_token_ids."""
        return (*super().stop_ids(), *self.config.stop_token_ids)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, S, S) -> (M, N, H) projected patch features."""
        return self.projector(self.vision(pixels))

    def splice(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids with image tokens, (M, N, H) features -> (B, T, H) input embeddings.

        Raises:
            ValueError: the number of image tokens is not M * N.
        """
        embeds = self.token_embeddings(input_ids)
        slots = input_ids == self.image_token_id  # (B, T)
        n = self.image_token_count
        given = 0 if image_features is None else image_features.shape[0]
        if int(slots.sum()) != given * n:
            raise ValueError(
                f"the text has {int(slots.sum()) / n:g} {IMAGE_TOKEN} placeholders but {given} images were given"
            )
        if given == 0:
            return embeds
        return embeds.masked_scatter(slots[..., None], image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))

    def forward(self, *, input_ids, attention_mask, pixels=None, labels=None):
        """Training/scoring pass. input_ids/attention_mask/labels: (B, T) with image tokens
        already expanded; pixels: (M, 3, S, S) for the images in reading order.
        Returns the LM's CausalLMOutputWithPast (loss when labels are given)."""
        features = self.encode_images(pixels) if pixels is not None and len(pixels) else None
        embeds = self.splice(input_ids, features)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    def expand(self, encoded: Encoded) -> tuple[list[int], list[int]]:
        """Each <image> token repeated N times (N = patch tokens per image), labels ignored there."""
        ids, labels = [], []
        for token, label in zip(encoded.ids, encoded.labels):
            copies = self.image_token_count if token == self.image_token_id else 1
            ids += [token] * copies
            labels += [IGNORE_INDEX if copies > 1 else label] * copies
        return ids, labels

    def build_prompt(self, input_ids, attention_mask, features, counts) -> Prompt:
        """The images' patch features spliced into the prompt embeddings."""
        return Prompt(self.splice(input_ids, torch.stack(features) if features else None), attention_mask)


def build_llava(
    *, vision: VisionTower, lm: nn.Module, tokenizer, projector: str = "mlp2x_gelu", max_length: int = 512
) -> LlavaModel:
    """A new LLaVA model from a pretrained vision tower and LM (the projector is random)."""
    check_max_length(lm, max_length)
    config = LlavaConfig(vision=vision.config, lm=lm.config.to_dict(), projector=projector, max_length=max_length)
    return LlavaModel(config=config, tokenizer=tokenizer, vision=vision, lm=lm)
