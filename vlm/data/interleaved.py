"""Multi-image training and evaluation data for Flamingo-style models, from easy-VQA.

- few-shot sequences: 1..max_chunks (image, question, answer) chunks in Flamingo's
  "<image>Question: q Answer: a<|endofchunk|>" format, every answer learnt;
- comparison questions: two images, then "are both shapes the same color?" (or shape),
  answered yes/no, half of each (or tilted by `skew`); optionally followed by "what color is the first
  shape?" (or shape), which makes the model carry the first image's attribute past the
  second image (text attends only to the most recent image).
"""

import random

from vlm.data import easyvqa
from vlm.data.records import VqaRecord
from vlm.lm import IMAGE_TOKEN

PAIR_QUESTIONS = {
    "color": "are both shapes the same color?",
    "shape": "are both shapes the same shape?",
}
FIRST_IMAGE_QUESTIONS = {
    "color": "what color is the first shape?",
    "shape": "what is the first shape?",
}


def fewshot_records(records: list[VqaRecord], count: int, *, max_chunks: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        chunks = rng.sample(records, rng.randint(1, max_chunks))
        out.append(
            {
                "id": f"fewshot-{i}",
                "images": [r.image for r in chunks],
                "fewshot": [[r.question, r.answer] for r in chunks],
            }
        )
    return out


def pair_records(
    images: list[easyvqa.EasyVqaImage], count: int, *, recall: float = 0.0, skew: float = 0.0, seed: int = 0
) -> list[dict]:
    """Two-image comparisons, balanced between yes and no for each attribute; a `recall`
    fraction of them followed by FIRST_IMAGE_QUESTIONS, answered from the first image.

    `skew` (at most 0.5) tilts how often the answer is yes by the first image's value
    (easyvqa.tilted_rate), so each image's value alone predicts the answer a little
    (why: easyvqa.balanced_yes_no).
    """
    if not 0.0 <= skew <= 0.5:
        raise ValueError(f"skew must be in [0, 0.5], got {skew}")
    rng = random.Random(seed)
    tilt = random.Random(seed + 1)  # a second stream: at 0 the pairs stay as they were
    out = []
    for i in range(count):
        attribute = "color" if i % 2 == 0 else "shape"
        want_same = i % 4 < 2
        first = rng.choice(images)
        if skew:
            want_same = tilt.random() < easyvqa.tilted_rate(getattr(first, attribute), skew)
        while True:
            second = rng.choice(images)
            if second.path != first.path and (getattr(first, attribute) == getattr(second, attribute)) == want_same:
                break
        conversation = [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{PAIR_QUESTIONS[attribute]}"},
            {"from": "gpt", "value": "yes" if want_same else "no"},
        ]
        if recall and rng.random() < recall:  # no draw at 0: the evaluation pairs stay as they were
            conversation += [
                {"from": "human", "value": FIRST_IMAGE_QUESTIONS[attribute]},
                {"from": "gpt", "value": getattr(first, attribute)},
            ]
        out.append({"id": f"pair-{i}", "images": [first.path, second.path], "conversations": conversation})
    return out
