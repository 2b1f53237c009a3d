"""The built-in easy-VQA dataset (`easyvqa:train`, `easyvqa:test`) as vlmstack records.

easy-VQA images show one coloured shape. The package ships only questions, so each
image's colour and shape are recovered from every question form about it:
"what color is the circle?" -> circle + answer, "is there not a red shape?" + "no" -> red,
"does the image contain a triangle?" + "no" -> not a triangle (used by elimination), ...
About 8% of images have no question that pins down their colour or shape; for those the
label is read off the pixels (see `labels_from_pixels`). On every image where both sources exist they agree
(tests/test_easyvqa.py checks this on the whole dataset).
"""

import functools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlm.data.records import CaptionRecord, VqaRecord

SPLITS = ("train", "test")
# The RGB values easy-VQA draws each colour with.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "rectangle", "triangle")
_NEGATED = re.compile(r"\bnot\b|^is no\b")


@dataclass(frozen=True)
class EasyVqaImage:
    path: str
    color: str
    shape: str

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape)


def caption_for(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r}; expected one of {SPLITS}")


@functools.lru_cache(maxsize=None)
def _raw(split: str):
    import easy_vqa

    _check_split(split)
    if split == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return questions, answers, ids, paths


def vqa_records(split: str) -> list[VqaRecord]:
    """Every (image, question, answer) triple of the split, in the package's order."""
    questions, answers, ids, paths = _raw(split)
    return [VqaRecord(paths[i], q, a) for q, a, i in zip(questions, answers, ids)]


def facts_from_questions(split: str) -> dict[int, tuple[dict, dict]]:
    """Per image id: ({colour: True/False}, {shape: True/False}) stated by its questions."""
    questions, answers, ids, _ = _raw(split)
    facts: dict[int, tuple[dict, dict]] = defaultdict(lambda: ({}, {}))
    for question, answer, image_id in zip(questions, answers, ids):
        colors, shapes = facts[image_id]
        if answer in COLORS:
            colors[answer] = True
        if answer in SHAPES:
            shapes[answer] = True
        words = set(re.findall(r"[a-z]+", question))
        if question.startswith("what"):
            truth = True  # "what color is the circle?" presupposes a circle
        else:
            truth = (answer == "yes") != bool(_NEGATED.search(question))
        for word in words & set(COLORS):
            colors[word] = truth
        for word in words & set(SHAPES):
            shapes[word] = truth
    return dict(facts)


def _resolve(stated: dict, vocabulary: tuple) -> str | None:
    """The one value stated true, or the only one left after the ones stated false."""
    true = [v for v, is_true in stated.items() if is_true]
    if len(true) == 1:
        return true[0]
    left = [v for v in vocabulary if stated.get(v, True)]
    return left[0] if len(left) == 1 else None


def labels_from_pixels(path: str) -> tuple[str, str]:
    """(colour, shape) read from the image's pixels.

    Colour: the palette colour with most pixels. Shape: a rectangle fills its bounding
    box; easy-VQA's triangles point up, so their top half holds far fewer pixels than
    their bottom half (ratio <= 0.44 on every labelled image; circles >= 0.72).
    """
    pixels = np.asarray(Image.open(path).convert("RGB"))
    counts = {c: int(np.all(pixels == rgb, axis=-1).sum()) for c, rgb in PALETTE.items()}
    color = max(counts, key=counts.get)
    mask = np.all(pixels == PALETTE[color], axis=-1)
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # (h, w)
    half = box.shape[0] // 2
    top, bottom = box[:half].sum(), box[box.shape[0] - half :].sum()
    if box.mean() > 0.95:
        shape = "rectangle"
    else:
        shape = "triangle" if top < 0.6 * bottom else "circle"
    return color, shape


@functools.lru_cache(maxsize=None)
def images(split: str) -> tuple[EasyVqaImage, ...]:
    """Every image of the split with its colour and shape, sorted by image id."""
    _, _, _, paths = _raw(split)
    facts = facts_from_questions(split)
    result = []
    for image_id in sorted(paths):
        colors, shapes = facts.get(image_id, ({}, {}))
        color, shape = _resolve(colors, COLORS), _resolve(shapes, SHAPES)
        if color is None or shape is None:
            pixel_color, pixel_shape = labels_from_pixels(paths[image_id])
            color, shape = color or pixel_color, shape or pixel_shape
        result.append(EasyVqaImage(paths[image_id], color, shape))
    return tuple(result)


def caption_records(split: str) -> list[CaptionRecord]:
    """One "a {colour} {shape}" caption per image."""
    return [CaptionRecord(image.path, image.caption) for image in images(split)]


def tilted_rate(value: str, skew: float) -> float:
    """A rate tilted by a colour's (shape's) place in COLORS (SHAPES): from 0.5 - skew for
    the first to 0.5 + skew for the last, evenly between."""
    values = COLORS if value in COLORS else SHAPES
    return 0.5 + skew * (2 * values.index(value) / (len(values) - 1) - 1)


# easy-VQA's yes/no question forms, as (template, negated); {} is "a red shape" style
# ("red shape") or a shape name ("circle"). The negated four are the first four with "not"/"no".
YES_NO_FORMS = (
    ("is there a {}?", False),
    ("is there a {} in the image?", False),
    ("is a {} present?", False),
    ("does the image contain a {}?", False),
    ("is there not a {}?", True),
    ("is there not a {} in the image?", True),
    ("is no {} present?", True),
    ("does the image not contain a {}?", True),
)


def balanced_yes_no(
    split: str,
    per_image: int,
    *,
    negated: float = 0.5,
    skew: float = 0.0,
    skew_attributes=("color", "shape"),
    seed: int = 0,
) -> list[VqaRecord]:
    """`per_image` extra yes/no questions per image, in easy-VQA's own forms, half of
    them about what the image shows. easy-VQA's colour questions are ~88% about an absent
    colour, so a model sees few "yes, that colour" cases; these even that out. Built from
    the split's labels only (use it on the train split).

    `negated` (at most 0.5) is the share of negated forms ("is there not a ..."). At 0.5,
    whether the asked value is shown says nothing about the answer until the model also
    reads the negation (yes = shown XOR negated), and gradient descent gets no signal to
    start the comparison from; below 0.5, "shown" alone predicts "yes".

    `skew` (at most 0.5) tilts how often the asked value is the one shown by the value
    shown (`tilted_rate`). Then the shown value alone, and the asked one alone, each
    predict the answer a little, so gradient descent first learns to bring both to where
    the model answers, and from there to compare them. In a text-only experiment (caption
    in context, these questions only), the tiny LM sat at chance for 1,000+ steps when
    balanced; with skew 0.4 and no negated forms it answered every probe question right
    by 1,000 steps (README, "Known limitation"). Negated forms at 0.5 cancel the tilt.
    `skew_attributes` ("color", "shape") says which questions are tilted; the others stay
    half about the shown value.
    """
    if not 0.0 <= negated <= 0.5:
        raise ValueError(f"negated must be in [0, 0.5], got {negated}")
    if not 0.0 <= skew <= 0.5:
        raise ValueError(f"skew must be in [0, 0.5], got {skew}")
    if unknown := set(skew_attributes) - {"color", "shape"}:
        raise ValueError(f"skew_attributes must be 'color' and/or 'shape', got {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    unnegate = np.random.default_rng(seed + 1)  # more streams: with the defaults the questions stay as they were
    tilt = np.random.default_rng(seed + 2)
    records = []
    for image in images(split):
        for k in range(per_image):
            about_color, present = rng.random() < 0.7, k % 2 == 0
            if skew and ("color" if about_color else "shape") in skew_attributes:
                present = tilt.random() < tilted_rate(image.color if about_color else image.shape, skew)
            if about_color:
                color = image.color if present else rng.choice([c for c in COLORS if c != image.color])
                subject = f"{color} shape"
            else:
                subject = image.shape if present else rng.choice([s for s in SHAPES if s != image.shape])
            form = int(rng.integers(len(YES_NO_FORMS)))
            if YES_NO_FORMS[form][1] and negated < 0.5 and unnegate.random() >= negated / 0.5:
                form -= len(YES_NO_FORMS) // 2  # the same form without "not"/"no"
            template, is_negated = YES_NO_FORMS[form]
            records.append(VqaRecord(image.path, template.format(subject), "yes" if present != is_negated else "no"))
    return records


def image_dir(split: str) -> Path:
    """The folder holding the split's PNG files."""
    return Path(images(split)[0].path).parent
