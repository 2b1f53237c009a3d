"""What the built-in easy-VQA training data holds besides the split's own questions and
captions: one object, nested in recipes as "mix" and passed down whole.

    {"mix": {"yes_no_per_image": 12, "yes_no_negated": 0.2, "recall_questions": 0.5}}

A field is used where the data can hold it: the yes/no and recall fields by every recipe
on a built-in split (LM corpus, LLaVA stage 2, Flamingo), few-shot sequences and
two-image comparisons by Flamingo. Data files (.json, .jsonl, .csv) get none of it.
"""

from dataclasses import dataclass

ANSWER_TYPES = ("yes/no", "color", "shape")


@dataclass
class EasyVqaMix:
    answer_types: tuple[str, ...] = ANSWER_TYPES  # asked by answer type; a curriculum starts without "yes/no"
    yes_no_per_image: int = 0  # extra balanced yes/no questions per image (easyvqa.balanced_yes_no)
    yes_no_negated: float = 0.5  # the share of those in negated forms
    yes_no_skew: float = 0.0  # per-value tilt of how often the asked value is shown; of "yes" in comparisons too
    yes_no_skew_attributes: tuple[str, ...] = ("color", "shape")  # which yes/no questions are tilted
    recall_questions: float = 0.0  # fraction of yes/no questions followed by "which color (shape) did I ask about?", and of comparisons by a question about the first image
    recall_attributes: tuple[str, ...] = ("color", "shape")  # which yes/no questions get recall questions
    fewshot_sequences: int = 0  # interleaved few-shot sequences (Flamingo)
    pair_questions: int = 0  # two-image comparisons (Flamingo)

    def __post_init__(self):
        unknown = set(self.answer_types) - set(ANSWER_TYPES)
        if unknown:
            raise ValueError(f"answer_types may hold {', '.join(ANSWER_TYPES)}; got {', '.join(sorted(unknown))}")
