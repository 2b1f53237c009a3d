"""Why LoRA alone could not teach llava-easyvqa the caption style "shape: circle; colour: red",
and trials of the fine-tuning recipe scored on held-out TRAIN images (the test split is
for the benchmark only).

    .venv/bin/python -m experiments.lora_caption_style --tokens-only
    .venv/bin/python -m experiments.lora_caption_style [--no-train-tokens] [--targets q_proj v_proj] [--seed 1]

First: how the tokenizer splits the style, and how often each piece occurs in the base's
easy-VQA training text (every train question and answer, and a caption per train image, in
the chat template), as input and as an answer token. Then (unless --tokens-only): fine-tune
on the benchmark's 1,000 training images, caption 200 other train images, and report the
share in the style and right, plus the teacher-forced loss and top-1 accuracy per answer
position on 64 of them. Prints JSON; writes nothing under docs/.
"""

import argparse
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

import torch

from benchmarks.finetune_lora import STYLE, answers, finetune_options, styled, write_styled
from vlm.chat_template import IGNORE_INDEX, encode_conversation
from vlm.data import easyvqa
from vlm.data.conversations import DEFAULT_CAPTION_PROMPT
from vlm.data.sequences import CollateSequences, ConversationDataset, encode_records
from vlm.finetune import finetune
from vlm.load import load_vlm


def token_counts(tokenizer) -> list[dict]:
    """Each piece of the style: occurrences in the base's training conversations, as input
    and as an answer token."""
    seen, said = Counter(), Counter()
    turns = [("<image>\n" + r.question, r.answer) for r in easyvqa.vqa_records("train")]
    turns += [("<image>\n" + DEFAULT_CAPTION_PROMPT, im.caption) for im in easyvqa.images("train")]
    for question, answer in turns:
        encoded = encode_conversation(tokenizer, [("user", question), ("assistant", answer)])
        seen.update(encoded.ids)
        said.update(label for label in encoded.labels if label != IGNORE_INDEX)
    pieces = tokenizer(" " + styled("circle", "red"), add_special_tokens=False)["input_ids"]
    return [
        {"token": tokenizer.convert_ids_to_tokens(i), "in_text": seen[i], "as_answer": said[i]}
        for i in dict.fromkeys(pieces)
    ]


def split_images() -> tuple[list, list]:
    """The benchmark's 1,000 training images, and 200 other train images to score on."""
    train = list(easyvqa.images("train"))
    chosen = random.Random(0).sample(train, 1000)
    paths = {im.path for im in chosen}
    return chosen, random.Random(1).sample([im for im in train if im.path not in paths], 200)


def per_position(model, images) -> list[dict]:
    """Teacher-forced loss and top-1 accuracy at each answer position of the style."""
    records = [
        {
            "image": im.path,
            "conversations": [
                {"from": "human", "value": "<image>\n" + DEFAULT_CAPTION_PROMPT},
                {"from": "gpt", "value": styled(im.shape, im.color)},
            ],
        }
        for im in images
    ]
    sequences = encode_records(records, model, model.max_length)
    dataset = ConversationDataset(sequences, transform=model.transform)
    batch = CollateSequences(model.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixels=batch["pixels"]
        ).logits
    logp = logits[:, :-1].log_softmax(-1)  # (B, T-1): position t predicts token t+1
    targets = batch["labels"][:, 1:]
    rows = []
    for row, target in zip(logp, targets):
        where = (target != IGNORE_INDEX).nonzero().flatten()
        rows.append([(-row[t, target[t]].item(), row[t].argmax().item() == target[t].item()) for t in where])
    pieces = model.tokenizer.convert_ids_to_tokens([label for label in sequences[0][1] if label != IGNORE_INDEX])
    return [
        {
            "position": k,
            "token (first image)": piece,
            "loss": round(sum(r[k][0] for r in rows) / len(rows), 3),
            "top1": round(sum(r[k][1] for r in rows) / len(rows), 2),
        }
        for k, piece in enumerate(pieces)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-only", action="store_true", help="only the tokenizer and text counts")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--targets", nargs="+", default=None)
    parser.add_argument("--train-tokens", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="LoRA's initial A matrices and the data order")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = load_vlm("llava-easyvqa")
    print(json.dumps({"style_tokens": token_counts(base.tokenizer)}))
    if args.tokens_only:
        return
    train, held_out = split_images()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_styled(Path(tmp) / "styled.jsonl", train)
        options = finetune_options(args)
        options.train.seed = args.seed
        torch.manual_seed(args.seed)  # peft draws LoRA's A matrices from the global generator
        card = finetune("llava-easyvqa", str(data), Path(tmp) / "adapter", options=options)
        adapted = load_vlm(str(Path(tmp) / "adapter"))
    captions = answers(adapted, [im.path for im in held_out], [DEFAULT_CAPTION_PROMPT] * len(held_out))
    matches = [STYLE.match(c) for c in captions]
    print(
        json.dumps(
            {
                "options": {"rank": options.rank, "targets": args.targets, "train_tokens": args.train_tokens},
                "seed": args.seed,
                "lr": options.train.lr,
                "epochs": options.train.epochs,
                "train_seconds": card["train_seconds"],
                "adapter_share": card["adapter_share"],
                "held_out_in_style": sum(m is not None for m in matches),
                "held_out_right": sum(
                    bool(m) and m.groups() == (im.shape, im.color) for m, im in zip(matches, held_out)
                ),
                "held_out": len(held_out),
                "validation": card["validation"],
                "examples": captions[:4],
                "per_position": per_position(adapted, held_out[:64]),
            }
        )
    )


if __name__ == "__main__":
    main()
