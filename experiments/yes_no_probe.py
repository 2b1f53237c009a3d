"""Where the VQA models' yes/no errors come from: "is there a X?" split by whether X is shown.

    .venv/bin/python -m experiments.yes_no_probe

Two probes, neither touching easyvqa:test:
- text: the language model alone, with the picture written as its caption in context,
  "(a red circle)\\nis there a red shape?", for every colour x shape x asked value x
  easy-VQA yes/no form; scored by whether " yes" or " no" gets the higher logit.
- vision: each VQA model on the train images its recipe held out for validation (never
  trained on), asked "is there a {colour} shape?" for all 8 colours and "is there a
  {shape}?" for all 3 shapes, generated and exact-matched like `eval vqa`.
Each is reported per (colour|shape question) x (value present|absent). The vision probe also
asks each image "what shape is in the image?", to tell a comparison failure from a model
that no longer recognises the shape. Writes docs/benchmarks/yes_no_probe.md and .json.
"""

import argparse

import torch

from benchmarks.common import write_report
from vlm.chat_template import encode_conversation
from vlm.data import easyvqa
from vlm.data.records import VqaRecord
from vlm.data.sequences import pad_right
from vlm.eval.vqa import evaluate_vqa
from vlm.lm import load_lm
from vlm.load import load_vlm
from vlm.train.splits import held_out

CASES = ("color, present", "color, absent", "shape, present", "shape, absent")
OPEN_SHAPE = "what shape? (open)"  # vision probe only


def text_cases() -> dict[str, list[tuple[str, str]]]:
    """Per case: (prompt with the caption in context, expected answer)."""
    cases: dict[str, list[tuple[str, str]]] = {case: [] for case in CASES}
    for color in easyvqa.COLORS:
        for shape in easyvqa.SHAPES:
            asked = [("color", f"{c} shape", c == color) for c in easyvqa.COLORS]
            asked += [("shape", s, s == shape) for s in easyvqa.SHAPES]
            for kind, subject, present in asked:
                for template, negated in easyvqa.YES_NO_FORMS:
                    prompt = f"({easyvqa.caption_for(color, shape)})\n{template.format(subject)}"
                    answer = "yes" if present != negated else "no"
                    cases[f"{kind}, {'present' if present else 'absent'}"].append((prompt, answer))
    return cases


@torch.inference_mode()
def text_probe(lm: str, batch_size: int = 128) -> dict[str, float]:
    model, tokenizer = load_lm(lm)
    yes, no = (tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0] for word in ("yes", "no"))
    result = {}
    for case, items in text_cases().items():
        hits = 0
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            encoded = [
                encode_conversation(tokenizer, [("user", prompt)], generation_prompt=True).ids for prompt, _ in batch
            ]
            ids = pad_right(encoded, tokenizer.pad_token_id)  # (B, T)
            mask = pad_right([[1] * len(sequence) for sequence in encoded], 0)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            last = logits[torch.arange(len(batch)), mask.sum(1) - 1]  # (B, V) at each prompt's end
            said_yes = (last[:, yes] > last[:, no]).tolist()
            hits += sum(said == (answer == "yes") for said, (_, answer) in zip(said_yes, batch))
        result[case] = hits / len(items)
    return result


def vision_records(val_fraction: float) -> dict[str, list[VqaRecord]]:
    records: dict[str, list[VqaRecord]] = {case: [] for case in (*CASES, OPEN_SHAPE)}
    for image in easyvqa.images("train"):
        if not held_out(image.path, val_fraction):
            continue
        records[OPEN_SHAPE].append(VqaRecord(image.path, "what shape is in the image?", image.shape))
        for color in easyvqa.COLORS:
            case = "color, present" if color == image.color else "color, absent"
            records[case].append(
                VqaRecord(image.path, f"is there a {color} shape?", "yes" if color == image.color else "no")
            )
        for shape in easyvqa.SHAPES:
            case = "shape, present" if shape == image.shape else "shape, absent"
            records[case].append(VqaRecord(image.path, f"is there a {shape}?", "yes" if shape == image.shape else "no"))
    return records


def vision_probe(model_name: str, val_fraction: float) -> dict[str, float]:
    model = load_vlm(model_name)
    return {
        case: evaluate_vqa(model, records, progress=False)["accuracy"]
        for case, records in vision_records(val_fraction).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="lm-easyvqa")
    parser.add_argument("--models", nargs="+", default=["llava-easyvqa", "flamingo-easyvqa"])
    parser.add_argument(
        "--val-fraction", type=float, default=0.02, help="the recipes' held-out fraction of train images"
    )
    args = parser.parse_args()
    rows = {f"{args.lm} (text, caption in context)": text_probe(args.lm)}
    for name in args.models:
        rows[f"{name} (held-out train images)"] = vision_probe(name, args.val_fraction)
    images = sum(held_out(image.path, args.val_fraction) for image in easyvqa.images("train"))
    questions = {case: len(items) for case, items in text_cases().items()}
    columns = (*CASES, OPEN_SHAPE)
    table = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table += [
        f"| {name} | " + " | ".join(f"{scores[c]:.3f}" if c in scores else "-" for c in columns) + " |"
        for name, scores in rows.items()
    ]
    sections = [
        "Accuracy on yes/no questions, split by whether the asked colour or shape is the one shown.",
        f"Text probe: {sum(questions.values())} prompts ({', '.join(f'{c}: {n}' for c, n in questions.items())}).",
        f"Vision probe: {images} held-out train images, 8 colour and 3 shape yes/no questions and one open shape question each.",
        "",
        *table,
    ]
    write_report("yes_no_probe", "Yes/no probe: is the asked value shown?", sections, {"results": rows})
    print("\n".join(table))


if __name__ == "__main__":
    main()
