"""The question-answering interface both visual language models share.

    vqa.answer(image, "what color is the shape?")                  # -> "red"
    vqa.answer_batch(images, questions)                            # batched
    for piece in vqa.chat(messages, images, stream=True): ...      # multi-turn, streaming

`messages` are {"role": "user"|"assistant", "content": str} dicts (or (role, text)
pairs); user messages mark where images go with "<image>", matched in order with
`images`. A question without an image is answered from text alone. A conversation too
long for the model's context loses its oldest turns (and their images), with a warning.

Flamingo-style few-shot prompts: `answer_batch(..., examples=[[(image, q, a), ...], ...])`.

The mixin of vlm/vision_language.VisionLanguageModel, whose abstract methods and
properties (tokenizer, max_length, image_token_count, expand, prepare, encode_images,
transform, and the two vlm.generation methods) are what it calls. Every method may be
called from several threads at once.
"""

import hashlib
import logging
import threading
from collections import OrderedDict
from typing import Iterator, Sequence

import torch

from vlm.chat_template import Encoded, encode_conversation, encode_fewshot, encode_with_template
from vlm.generation import GenerationConfig, generate
from vlm.images import ImageSource
from vlm.lm import IMAGE_TOKEN

log = logging.getLogger(__name__)
FEATURE_CACHE_SIZE = 256  # images whose features are kept between calls


class ChatMixin:
    _feature_lock = threading.Lock()  # the cache is shared by concurrent calls (the app's users)

    def image_features(self, images: Sequence[ImageSource]) -> list[torch.Tensor]:
        """Per image, the model's visual features; each distinct image is encoded once and
        kept (by pixel content) for later turns and questions. Safe to call from several
        threads at once."""
        pixels = [self.transform(image) for image in images]
        keys = [hashlib.sha1(p.numpy().tobytes()).hexdigest() for p in pixels]
        with self._feature_lock:
            cache = self.__dict__.setdefault("_feature_cache", OrderedDict())
            found = {key: cache[key] for key in keys if key in cache}
        unique = {key: i for i, key in enumerate(keys) if key not in found}
        if unique:
            with torch.inference_mode():
                found.update(zip(unique, self.encode_images(torch.stack([pixels[i] for i in unique.values()]))))
        with self._feature_lock:
            for key in keys:  # most recently used last; the oldest go once the cache is full
                cache[key] = found[key]
                cache.move_to_end(key)
            while len(cache) > FEATURE_CACHE_SIZE:
                cache.popitem(last=False)
        return [found[key] for key in keys]

    def fit_to_context(self, turns: list[tuple[str, str]], images: list, max_new_tokens: int) -> tuple[list, list]:
        """Check placeholders against images; drop the oldest turns until the prompt fits.

        Raises:
            ValueError: the number of <image> placeholders differs from len(images),
                max_new_tokens fills the context, or even the last turn alone does not fit.
        """
        placeholders = sum(text.count(IMAGE_TOKEN) for role, text in turns if role == "user")
        if placeholders != len(images):
            raise ValueError(
                f"the conversation has {placeholders} {IMAGE_TOKEN} placeholders but {len(images)} images were given"
            )
        budget = self.max_length - max_new_tokens
        if budget < 1:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room for the question in the model's {self.max_length}-token context; ask for fewer"
            )
        dropped = 0
        while True:
            length = len(self.encode_turns(turns, generation_prompt=True).ids)
            length += placeholders * (self.image_token_count - 1)
            if length <= budget:
                break
            if len(turns) <= 1:
                raise ValueError(
                    f"the question is too long: {length} tokens, the model takes {budget} before its answer"
                )
            cut = 2 if len(turns) > 2 else 1
            lost = sum(text.count(IMAGE_TOKEN) for role, text in turns[:cut] if role == "user")
            turns, images, placeholders, dropped = turns[cut:], images[lost:], placeholders - lost, dropped + cut
        if dropped:
            log.warning(
                "conversation longer than the model's %d-token context: dropped the oldest %d turns",
                self.max_length,
                dropped,
            )
        return turns, images

    def encode_turns(self, turns: list[tuple[str, str]], *, generation_prompt: bool = False) -> Encoded:
        """A conversation in the model's chat template (a checkpoint's own, else vlmstack's), one token per image."""
        template = getattr(self.config, "chat_template", None)
        if template:
            return encode_with_template(self.tokenizer, template, turns, generation_prompt=generation_prompt)
        return encode_conversation(self.tokenizer, turns, generation_prompt=generation_prompt)

    def encode(self, turns: list[tuple[str, str]], *, generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation, image tokens expanded for this model."""
        return self.expand(self.encode_turns(turns, generation_prompt=generation_prompt))

    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end an answer: the tokenizer's eos, and <|endofchunk|> where the model has it."""
        return tuple(t for t in (self.tokenizer.eos_token_id, self.chunk_end_id) if t is not None)

    def generate_ids(self, sequences: list[list[int]], images: list[list], config: GenerationConfig) -> list[str]:
        """Batched generation from prompt token ids (image tokens expanded) and their images."""
        prompt = self.prepare(sequences, images)
        steps = list(
            generate(self, prompt, stop_ids=self.stop_ids(), pad_id=self.tokenizer.pad_token_id, config=config)
        )
        if not steps:
            return [""] * len(sequences)
        tokens = torch.stack(steps, dim=1)  # (B, new)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]

    def generate_texts(
        self, conversations: list[list[tuple[str, str]]], images: list[list], config: GenerationConfig | None = None
    ) -> list[str]:
        """Batched generation: one answer per conversation (each ending with a user turn)."""
        config = config or GenerationConfig()
        fitted = [self.fit_to_context(list(c), list(i), config.max_new_tokens) for c, i in zip(conversations, images)]
        sequences = [self.encode(turns, generation_prompt=True)[0] for turns, _ in fitted]
        return self.generate_ids(sequences, [i for _, i in fitted], config)

    def answer(self, image: ImageSource | None, question: str, **generation) -> str:
        """One question about one image (or none)."""
        return self.answer_batch([image], [question], **generation)[0]

    def answer_batch(
        self,
        images: Sequence[ImageSource | None],
        questions: Sequence[str],
        *,
        examples: list[list[tuple]] | None = None,
        **generation,
    ) -> list[str]:
        """Answers to questions about images. `examples[i]`, if given, is a list of (image,
        question, answer) shown before question i in Flamingo's few-shot format."""
        config = GenerationConfig(**generation)
        if examples is not None:
            sequences, image_lists = [], []
            for image, question, shots in zip(images, questions, examples):
                encoded = encode_fewshot(self.tokenizer, [(q, a) for _, q, a in shots], question)
                sequences.append(self.expand(encoded)[0])
                image_lists.append([im for im, _, _ in shots] + [image])
            return self.generate_ids(sequences, image_lists, config)
        conversations = [
            [("user", f"{IMAGE_TOKEN}\n{q}" if image is not None else q)] for image, q in zip(images, questions)
        ]
        image_lists = [[image] if image is not None else [] for image in images]
        return self.generate_texts(conversations, image_lists, config)

    def chat(self, messages: list, images: Sequence[ImageSource] = (), *, stream: bool = False, **generation):
        """The assistant's reply to a conversation; with stream=True, an iterator of text pieces."""
        turns = [(m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in messages]
        config = GenerationConfig(**generation)
        pieces = self._stream(turns, list(images), config)
        return pieces if stream else "".join(pieces).strip()

    def _stream(self, turns, images, config: GenerationConfig) -> Iterator[str]:
        turns, images = self.fit_to_context(turns, images, config.max_new_tokens)
        prompt = self.prepare([self.encode(turns, generation_prompt=True)[0]], [images])
        tokens: list[int] = []
        emitted = 0  # characters of the decoded text already yielded
        for step in generate(self, prompt, stop_ids=self.stop_ids(), pad_id=self.tokenizer.pad_token_id, config=config):
            tokens.append(int(step[0]))
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) <= emitted or text.endswith("\ufffd"):  # wait out half a multi-byte character
                continue
            piece = text[emitted:] if emitted else text.lstrip()
            emitted = len(text)
            if piece:
                yield piece
