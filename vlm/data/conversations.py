"""LLaVA-format conversation datasets.

A record is {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]} — the LLaVA JSON format; `image` is absolute here.

From easy-VQA: each image's questions become multi-turn conversations (the image in the
first turn), and each caption a "describe the image" exchange.
"""

import json
import random
import re
from collections import defaultdict
from pathlib import Path

from vlm.data import easyvqa
from vlm.data.mix import EasyVqaMix
from vlm.data.records import CaptionRecord, VqaRecord
from vlm.errors import VlmError
from vlm.eval.vqa import answer_type
from vlm.lm import IMAGE_TOKEN

# Instructions for a caption; varied so the model learns the task, not one string.
CAPTION_PROMPTS = (
    "Describe the image.",
    "What is in this picture?",
    "Give a short caption for this image.",
    "Describe what you see.",
)
DEFAULT_CAPTION_PROMPT = CAPTION_PROMPTS[0]


def _turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def caption_conversations(records: list[CaptionRecord], *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "id": f"caption-{i}",
            "image": r.image,
            "conversations": [_turn("human", f"{IMAGE_TOKEN}\n{rng.choice(CAPTION_PROMPTS)}"), _turn("gpt", r.caption)],
        }
        for i, r in enumerate(records)
    ]


def vqa_conversations(records: list[VqaRecord], *, max_turns: int = 4, seed: int = 0) -> list[dict]:
    """Group each image's questions into conversations of 1..max_turns exchanges."""
    rng = random.Random(seed)
    by_image: dict[str, list[VqaRecord]] = defaultdict(list)
    for record in records:
        by_image[record.image].append(record)
    conversations = []
    for image, questions in by_image.items():
        rng.shuffle(questions)
        start = 0
        while start < len(questions):
            group = questions[start : start + rng.randint(1, max_turns)]
            start += len(group)
            turns = []
            for k, q in enumerate(group):
                turns += [
                    _turn("human", f"{IMAGE_TOKEN}\n{q.question}" if k == 0 else q.question),
                    _turn("gpt", q.answer),
                ]
            conversations.append({"id": f"vqa-{len(conversations)}", "image": image, "conversations": turns})
    return conversations


def read_llava_json(path: str | Path) -> list[dict]:
    """LLaVA conversation records from a JSON list; image paths ("image", or "images" for
    several) made absolute.

    Raises:
        VlmError: unreadable file or a record without image/conversations.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise VlmError(f"{path}: cannot read conversations ({e})") from None
    if not isinstance(records, list):
        raise VlmError(f"{path}: expected a JSON list of conversation records")
    for n, record in enumerate(records):
        if not isinstance(record, dict) or "conversations" not in record:
            raise VlmError(f"{path}: record {n} has no conversations")
        if record.get("image"):
            record["image"] = str((path.parent / record["image"]).resolve())
        if "images" in record:
            record["images"] = [str((path.parent / image).resolve()) for image in record["images"]]
    return records


RECALL_QUESTIONS = {"color": "which color did I ask about?", "shape": "which shape did I ask about?"}


def add_recall_questions(
    conversations: list[dict], fraction: float, *, attributes=("color", "shape"), seed: int = 0
) -> list[dict]:
    """After each yes/no question that names a colour (or a shape; `attributes` says
    which), with probability `fraction`, ask back which colour (shape) was asked about;
    the answer is that word. In place; returns them.

    Why: a model must bring the question's colour to where it answers before it can
    compare it with the image's, and a yes/no answer alone gives gradient descent nothing
    to start that from (the tiny models stayed at "colour absent" for every colour
    question). Repeating the colour is a plain copy that does; see README, "Known limitation".
    """
    rng = random.Random(seed)
    names = [
        (attribute, word, re.compile(rf"\b{word}\b"))
        for attribute, words in (("color", easyvqa.COLORS), ("shape", easyvqa.SHAPES))
        if attribute in attributes
        for word in words
    ]
    for conversation in conversations:
        turns, out = conversation["conversations"], []
        for question, answer in zip(turns[0::2], turns[1::2]):
            out += [question, answer]
            asked = [(attribute, word) for attribute, word, pattern in names if pattern.search(question["value"])]
            if answer["value"] in ("yes", "no") and asked and rng.random() < fraction:
                attribute, word = asked[0]
                out += [_turn("human", RECALL_QUESTIONS[attribute]), _turn("gpt", word)]
        conversation["conversations"] = out
    return conversations


def easyvqa_conversations(split: str, mix: EasyVqaMix | None = None, *, seed: int = 0) -> list[dict]:
    """All of a split's questions as conversations, plus one caption exchange per image,
    plus the mix's balanced yes/no questions (easyvqa.balanced_yes_no), some of them
    followed by recall questions (add_recall_questions). Questions whose answer type is
    not in mix.answer_types are left out (captions stay)."""
    mix = mix or EasyVqaMix()
    records = easyvqa.vqa_records(split) + easyvqa.balanced_yes_no(
        split,
        mix.yes_no_per_image,
        negated=mix.yes_no_negated,
        skew=mix.yes_no_skew,
        skew_attributes=mix.yes_no_skew_attributes,
        seed=seed,
    )
    records = [r for r in records if answer_type(r.answer) in mix.answer_types]
    questions = add_recall_questions(
        vqa_conversations(records, seed=seed), mix.recall_questions, attributes=mix.recall_attributes, seed=seed
    )
    return questions + caption_conversations(easyvqa.caption_records(split), seed=seed)
