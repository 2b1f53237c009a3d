"""Visual question answering accuracy: generate, normalise, exact match.

Normalising lowercases, strips punctuation and the articles a/an/the, and collapses
spaces, so "A red circle." matches "red circle". Answer types: "yes/no", "color",
"shape" (easy-VQA's vocabulary), "number", else "other".
"""

import logging
import random
import re
import string
from collections import defaultdict
from typing import Sequence

from vlm.data import easyvqa
from vlm.data.records import VqaRecord
from vlm.errors import ImageError
from vlm.images import load_image
from vlm.progress import progress_bar

log = logging.getLogger(__name__)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_type(answer: str) -> str:
    answer = normalize_answer(answer)
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in easyvqa.COLORS:
        return "color"
    if answer in easyvqa.SHAPES:
        return "shape"
    return "number" if answer.replace(".", "", 1).isdigit() else "other"


def vqa_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """{"accuracy", "n", "per_answer_type": {type: accuracy}} by normalised exact match."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for predicted, answer in zip(predictions, answers):
        by_type[answer_type(answer)].append(normalize_answer(predicted) == normalize_answer(answer))
    hits = [h for group in by_type.values() for h in group]
    return {
        "accuracy": sum(hits) / len(hits) if hits else 0.0,
        "n": len(hits),
        "per_answer_type": {t: sum(g) / len(g) for t, g in sorted(by_type.items())},
    }


def evaluate_vqa(
    model,
    records: Sequence[VqaRecord],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    shots: int = 0,
    shot_pool: Sequence[VqaRecord] | None = None,
    progress: bool = True,
) -> dict:
    """Answer every question (batched, questions about one image kept together so its
    features are computed once) and score them. Unreadable images are skipped and logged.

    shots > 0 puts that many solved examples from `shot_pool` (seeded choice per
    question; keep the pool disjoint from the evaluated data) before each question.
    """
    if shots and not shot_pool:
        raise ValueError("few-shot evaluation needs a pool of solved examples")
    rng = random.Random(0)
    order = sorted(range(len(records)), key=lambda i: records[i].image)
    images: dict[str, object] = {}
    predictions, answers, failed = [], [], set()
    with progress_bar(total=len(records), desc="answering", unit="q", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = [records[i] for i in order[start : start + batch_size]]
            usable = []
            for record in batch:
                if record.image not in images and record.image not in failed:
                    try:
                        images[record.image] = load_image(record.image)
                    except ImageError as e:
                        log.warning("skipped %s", e)
                        failed.add(record.image)
                if record.image in images:
                    usable.append(record)
            if usable:
                examples = (
                    [[(e.image, e.question, e.answer) for e in rng.sample(shot_pool, shots)] for _ in usable]
                    if shots
                    else None
                )
                predictions += model.answer_batch(
                    [images[r.image] for r in usable],
                    [r.question for r in usable],
                    examples=examples,
                    max_new_tokens=max_new_tokens,
                )
                answers += [r.answer for r in usable]
            if len(images) > 4 * batch_size:  # keep only images still to come
                images = {k: v for k, v in images.items() if k >= batch[-1].image}
            bar.update(len(batch))
    if failed:
        log.warning("%d images could not be read; their questions were not scored", len(failed))
    return vqa_metrics(predictions, answers)
