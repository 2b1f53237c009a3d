"""The base of both visual language models: a CLIP vision tower, a causal LM with its
tokenizer, a typed config, chat and generation (vlm/chat.py, vlm/generation.py), and one
model directory format (config.json, model.safetensors, tokenizer files).

A subclass (vlm/llava.py, vlm/flamingo.py) says only how images reach the LM:

    image_token_count                     tokens one image occupies in the sequence
    encode_images(pixels)                 (M, 3, S, S) -> (M, ...) features per image
    expand(encoded)                       ids/labels with each image's tokens expanded
    build_prompt(ids, mask, features, counts) -> Prompt for generation
    media(prompt, start, length)          context an LM call on the prompt runs in
                                          (Flamingo: its images' latents; LLaVA: none)
"""

import abc
import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoTokenizer, DynamicCache

from vlm import hub
from vlm.chat import ChatMixin
from vlm.chat_template import Encoded
from vlm.errors import VlmError
from vlm.generation import Prompt, left_pad
from vlm.lm import (
    CHUNK_END,
    IMAGE_TOKEN,
    MEDIA_TOKENS,
    add_media_tokens,
    check_max_length,
    lm_from_config,
    remote_code_files,
)
from vlm.schema import from_dict
from vlm.vision import VisionTower


class VisionLanguageModel(ChatMixin, nn.Module, metaclass=abc.ABCMeta):
    config_class: ClassVar[type]  # the subclass's config dataclass (vision, lm, max_length, ...)
    media_tokens: ClassVar[tuple[str, ...]] = MEDIA_TOKENS  # the tokens the tokenizer must know

    def __init__(self, *, config, tokenizer, vision: VisionTower | None = None, lm: nn.Module | None = None):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        self.vision = vision or VisionTower(config=config.vision)
        self.lm = lm if lm is not None else lm_from_config(config.lm)
        ids = dict(zip(self.media_tokens, add_media_tokens(self.lm, tokenizer, self.media_tokens)))
        self.image_token_id, self.chunk_end_id = ids[IMAGE_TOKEN], ids.get(CHUNK_END)
        self.config.lm = self.lm.config.to_dict()  # with the media tokens' rows added

    @property
    def max_length(self) -> int:
        """Tokens per sequence, image tokens included."""
        return self.config.max_length

    @property
    def hidden_size(self) -> int:
        return self.lm.get_input_embeddings().embedding_dim

    @property
    def transform(self):
        """Image source -> (3, S, S) vision tower input."""
        return self.vision.transform

    @property
    @abc.abstractmethod
    def image_token_count(self) -> int:
        """Tokens one image occupies in the LM sequence."""

    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, S, S) pixels -> (M, ...) what the LM receives of each image."""

    @abc.abstractmethod
    def expand(self, encoded: Encoded) -> tuple[list[int], list[int]]:
        """Token ids and labels of an encoded conversation with each image's tokens expanded."""

    @abc.abstractmethod
    def build_prompt(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: list[torch.Tensor], counts: list[int]
    ) -> Prompt:
        """(B, T) left-padded ids and mask, the images' features in reading order and how
        many images each row has -> the Prompt `step` continues from."""

    def media(self, prompt: Prompt, start: int, length: int):
        """The context in which an LM call on tokens start..start+length of `prompt` runs."""
        return contextlib.nullcontext()

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H)."""
        return self.lm.get_input_embeddings()(ids)

    def prepare(self, sequences: list[list[int]], images: list[list]) -> Prompt:
        """The generation prompt from expanded token ids and each row's images."""
        input_ids, mask = left_pad(sequences, self.tokenizer.pad_token_id)
        flat = [image for group in images for image in group]
        features = self.image_features(flat) if flat else []
        with torch.inference_mode():
            return self.build_prompt(input_ids, mask, features, [len(group) for group in images])

    def step(self, embeds, attention_mask, position_ids, cache, prompt: Prompt, start: int):
        """One LM call for generation (see vlm/generation.py): (B, T, H) embeds -> ((B, T, V) logits, cache)."""
        cache = cache if cache is not None else DynamicCache()
        with self.media(prompt, start, embeds.shape[1]):
            out = self.lm(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
        return out.logits, out.cache

    def save(self, directory: str | Path, *, dtype: torch.dtype | None = None) -> None:
        """config.json, tokenizer files and model.safetensors (optionally cast, e.g. fp16 to ship)."""
        hub.save_config(directory, asdict(self.config))
        hub.save_pretrained(self.tokenizer, directory)
        hub.save_module(directory, self, dtype=dtype)

    @classmethod
    def load(cls, directory: str | Path, *, trust_remote_code: bool = False):
        """The model a `save` wrote, in eval mode. `trust_remote_code` allows a language
        model whose Python code is saved with it (an imported OpenFlamingo with MPT).

        Raises:
            VlmError: a config this class cannot read, weights that do not fit it, or an LM
                with its own code without `trust_remote_code` (or with its files missing).
        """
        directory = Path(directory)
        config = from_dict(cls.config_class, hub.read_config(directory), str(directory / hub.CONFIG_FILE))
        check_remote_code(directory, config.lm, trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise VlmError(
                f"{directory}: cannot read the tokenizer files ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        with hub.config_errors(directory, config.kind):
            if not hub.is_count(config.max_length):
                raise ValueError(f"max_length must be a whole number of at least 1, not {config.max_length!r}")
            model = cls(config=config, tokenizer=tokenizer, lm=lm_from_config(config.lm, code_dir=directory))
            check_max_length(model.lm, config.max_length)
        hub.load_module(directory, model)
        return model.eval()


def check_remote_code(directory: Path, lm_config: dict, trust_remote_code: bool) -> None:
    """Refuse (one line) an LM whose Python code is saved in `directory` unless trusted, or
    whose code files are missing."""
    files = remote_code_files(lm_config) if isinstance(lm_config, dict) else []
    if files and not trust_remote_code:
        raise VlmError(
            f"{directory}: its language model runs Python code saved with it ({', '.join(files)}); "
            "pass --trust-remote-code (load_vlm(..., trust_remote_code=True)) only if you trust where it came from"
        )
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise VlmError(f"{directory}: {', '.join(missing)} missing (the language model's code); import the model again")
