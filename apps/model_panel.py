"""What the app says about a VQA model: what it is, what it was trained on, what it can
and cannot answer, and its measured accuracy, all read from the model's directory
(`config.json`, `model_card.json`), never written into the page by hand.

The rule for questions without a picture: a model whose card lists only image datasets
(every `data` of its recipe is `easyvqa:...`, where each example has a picture) never saw
a question without one, so the app answers such a question with a notice instead of a
guess. A model without a card (an imported checkpoint) is trusted to chat without images.
"""

import json
import re
from pathlib import Path

from vlm.data import easyvqa
from vlm.hub import model_kind, resolve_dir

IMAGE_ONLY_SOURCES = ("easyvqa:",)  # data sources whose every example carries a picture
KIND_NAMES = {"llava": "LLaVA-style (image patches projected into the LM's input)", "flamingo": "Flamingo-style"}
EXAMPLE_QUESTIONS = ("what color is the shape?", "what shape is it?", "is there a triangle?")


def _read(directory: Path | None, name: str) -> dict:
    try:
        return json.loads((directory / name).read_text()) if directory else {}
    except (OSError, ValueError):
        return {}


def _data_sources(recipe) -> list[str]:
    """Every `data` value in a (nested) recipe, its pipeline's phases included."""
    if isinstance(recipe, dict):
        found = [recipe["data"]] if isinstance(recipe.get("data"), str) else []
        return found + [s for v in recipe.values() for s in _data_sources(v)]
    if isinstance(recipe, list):
        return [s for v in recipe for s in _data_sources(v)]
    return []


def _image_size(config) -> int | None:
    if isinstance(config, dict):
        if isinstance(config.get("image_size"), int):
            return config["image_size"]
        for value in config.values():
            size = _image_size(value)
            if size:
                return size
    return None


class ModelFacts:
    """What a model's directory says about it."""

    def __init__(self, name: str, source: str | None = None):
        self.name = name
        directory = resolve_dir(source or name)
        self.card, self.config = _read(directory, "model_card.json"), _read(directory, "config.json")
        self.kind = self.card.get("kind") or (model_kind(directory) if directory else None)
        self.sources = _data_sources(self.card.get("recipe", {}))
        self.image_size = _image_size(self.config.get("vision", self.config))

    @property
    def easyvqa(self) -> bool:
        return bool(self.sources) and all(s.startswith("easyvqa:") for s in self.sources)

    @property
    def image_only(self) -> bool:
        """Trained only on examples with a picture (see the module docstring)."""
        return bool(self.sources) and all(s.startswith(IMAGE_ONLY_SOURCES) for s in self.sources)

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` that none of an easy-VQA model's training captions holds
        ("a <colour> <shape>"), in order; [] for other models (their words are not known
        here). A CLIP trained on 11 words maps every other word somewhere among them, so
        such a query scores as high as a good one: this is how the app tells them apart."""
        if not self.easyvqa:
            return []
        known = {"a", *easyvqa.COLORS, *easyvqa.SHAPES}
        words = re.findall(r"[^\W\d_]+", text.lower())
        return list(dict.fromkeys(w for w in words if w not in known))

    def accuracy(self) -> dict | None:
        metrics = self.card.get("test_metrics") or {}
        return metrics if "accuracy" in metrics else None

    def no_image_notice(self) -> str:
        return (
            f"{self.name} was trained only on questions about a picture, so it would guess. "
            "Attach an image (or click an example below) and ask about it."
        )

    def markdown(self) -> str:
        """The panel's text."""
        lines = [f"**{self.name}** · {KIND_NAMES.get(self.kind, self.kind or 'VQA model')}"]
        if self.easyvqa:
            size = f"{self.image_size}×{self.image_size}" if self.image_size else "small"
            lines.append(
                f"Trained on easy-VQA ({', '.join(sorted(set(self.sources)))}): {size} pictures of one coloured shape. "
                f"It knows {len(easyvqa.COLORS)} colours ({', '.join(easyvqa.COLORS)}) and "
                f"{len(easyvqa.SHAPES)} shapes ({', '.join(easyvqa.SHAPES)})."
            )
            lines.append(
                "**Can answer:** what colour / what shape / yes-no questions about one such picture. "
                "**Cannot:** real photos, counting, reading text, or questions without a picture."
            )
        elif self.sources:
            lines.append(f"Trained on {', '.join(sorted(set(self.sources)))}.")
        else:
            lines.append("No model card: what it was trained on is not recorded here.")
        metrics = self.accuracy()
        if metrics:
            per_type = ", ".join(f"{k} {v:.1%}" for k, v in (metrics.get("per_answer_type") or {}).items())
            lines.append(
                f"**Measured accuracy:** {metrics['accuracy']:.1%} on {metrics.get('n', '?'):,} questions of "
                f"{metrics.get('data', 'its test set')}" + (f" ({per_type})." if per_type else ".")
            )
        return "\n\n".join(lines)


def example_messages(count: int = 3) -> list[dict]:
    """Chat examples: easy-VQA test pictures with questions the shipped models answer."""
    pictures = easyvqa.images("test")[:count]
    return [
        {"text": question, "files": [picture.path]}
        for picture, question in zip(pictures, EXAMPLE_QUESTIONS * (count // len(EXAMPLE_QUESTIONS) + 1))
    ]
