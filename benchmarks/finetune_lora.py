"""LoRA benchmark: teach llava-easyvqa a new caption style on 1,000 training images.

    .venv/bin/python -m benchmarks.finetune_lora [--images 1000] [--rank 8] [--no-train-tokens]

Writes captions "shape: circle; colour: red" for 1,000 easyvqa:train images (a fixed
sample), runs `vlmstack finetune`'s code path (vlm.finetune.finetune, its default recipe
unless a flag says otherwise) on them, then
captions all 1,000 easyvqa:test images with the adapter (prompt 'Describe the image.',
the default of `vlmstack caption`). A caption counts when it is exactly in the new style
and names the image's shape and colour. Also: the adapter's share of the parameters, the
training time, and whether the base answers exactly as before with the adapter off (test
questions and captions, adapted model with LoRA switched off vs the base loaded alone).
Writes docs/benchmarks/finetune_lora.md and .json.
"""

import argparse
import json
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from benchmarks.common import timed, write_report
from vlm.adapters import read_adapter_config, set_adapter_enabled
from vlm.data import easyvqa
from vlm.data.conversations import DEFAULT_CAPTION_PROMPT
from vlm.finetune import FinetuneOptions, finetune
from vlm.load import load_vlm

STYLE = re.compile(r"^shape: ([a-z]+); colour: ([a-z]+)$")


def styled(shape: str, color: str) -> str:
    return f"shape: {shape}; colour: {color}"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def answers(model, images: list[str], questions: list[str], batch: int = 16) -> list[str]:
    out = []
    for start in range(0, len(images), batch):
        out += model.answer_batch(images[start : start + batch], questions[start : start + batch])
    return out


def write_styled(path: Path, images) -> Path:
    """A captions JSONL of `images` in the new style."""
    path.write_text(
        "".join(json.dumps({"image": im.path, "caption": styled(im.shape, im.color)}) + "\n" for im in images)
    )
    return path


def finetune_options(args) -> FinetuneOptions:
    """vlmstack finetune's defaults, with --targets/--no-train-tokens/--rank/--lr/--epochs applied."""
    options = FinetuneOptions(targets=args.targets, train_tokens=args.train_tokens)
    options.rank = args.rank or options.rank
    options.train.lr = args.lr or options.train.lr
    options.train.epochs = args.epochs or options.train.epochs
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="training images given the new style")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: vlmstack finetune's)")
    parser.add_argument("--targets", nargs="+", default=None, help="LoRA targets (default: vlmstack finetune's)")
    parser.add_argument(
        "--train-tokens", action=argparse.BooleanOptionalAction, default=True, help="train the answers' token rows"
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: vlmstack finetune's)")
    parser.add_argument("--epochs", type=int, default=None, help="default: vlmstack finetune's")
    parser.add_argument("--check", type=int, default=300, help="test questions + captions for the adapter-off check")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train = random.Random(0).sample(list(easyvqa.images("train")), args.images)
    test = list(easyvqa.images("test"))
    load_before, uptime_before = os.getloadavg(), uptime()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_styled(Path(tmp) / "styled.jsonl", train)
        options = finetune_options(args)
        card, seconds = timed(finetune, "llava-easyvqa", str(data), Path(tmp) / "adapter", options=options)
        settings = read_adapter_config(Path(tmp) / "adapter").settings
        adapted = load_vlm(str(Path(tmp) / "adapter"))
        trained_tokens = adapted.tokenizer.convert_ids_to_tokens(settings.tokens)
        captions, caption_seconds = timed(
            answers, adapted, [im.path for im in test], [DEFAULT_CAPTION_PROMPT] * len(test)
        )
        matches = [STYLE.match(c) for c in captions]
        in_style = sum(m is not None for m in matches)
        right = sum(m is not None and m.groups() == (im.shape, im.color) for m, im in zip(matches, test))
        wrong = [
            f"{Path(im.path).name} ({im.color} {im.shape}): {c}"
            for c, m, im in zip(captions, matches, test)
            if not (m and m.groups() == (im.shape, im.color))
        ]

        questions = easyvqa.vqa_records("test")[: args.check]
        check_images = [q.image for q in questions] + [im.path for im in test[: args.check]]
        check_prompts = [q.question for q in questions] + [DEFAULT_CAPTION_PROMPT] * args.check
        vqa_on = answers(adapted, check_images[: args.check], check_prompts[: args.check])
        set_adapter_enabled(adapted, False)
        adapted._feature_cache.clear()
        off = answers(adapted, check_images, check_prompts)
        base = answers(load_vlm("llava-easyvqa"), check_images, check_prompts)
    same = sum(a == b for a, b in zip(off, base))
    vqa_right = {
        "adapter on": sum(a == q.answer for a, q in zip(vqa_on, questions)),
        "base": sum(a == q.answer for a, q in zip(base, questions)),
    }
    n = len(test)
    results = {
        "train_images": args.images,
        "rank": settings.rank,
        "targets": settings.targets,
        "trained_token_rows": trained_tokens,
        "epochs": options.train.epochs,
        "lr": options.train.lr,
        "test_captions": n,
        "in_style": in_style,
        "in_style_and_right": right,
        "share_right": right / n,
        "adapter_parameters": card["adapter_parameters"],
        "base_parameters": card["base_parameters"],
        "adapter_share": card["adapter_share"],
        "train_seconds": card["train_seconds"],
        "finetune_call_seconds": round(seconds, 1),
        "caption_seconds": round(caption_seconds, 1),
        "adapter_off_equal_to_base": same,
        "adapter_off_checked": len(base),
        "vqa_right_of_first_questions": {**vqa_right, "n": args.check},
        "validation": card["validation"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "uptime_before": uptime_before,
        "uptime_after": uptime(),
        "examples": captions[:3],
        "wrong": wrong,
    }
    rows = ", ".join(f"`{t}`" for t in trained_tokens) or "none"
    style_pieces = " ".join(f"`{t}`" for t in adapted.tokenizer.tokenize(" " + styled("circle", "red")))
    sections = [
        f"LoRA rank {settings.rank} (alpha {settings.alpha:g}) on the LM's {', '.join(settings.targets)}, projector "
        f"frozen; embedding rows trained for the {len(trained_tokens)} tokens the answers use ({rows}); "
        f"{args.images} easyvqa:train images captioned `{styled('circle', 'red')}` (tokenised {style_pieces}); "
        f"{options.train.epochs} epochs, batch {options.train.batch_size}, lr {options.train.lr:g}, bf16 autocast "
        f"where native. Test: all 1,000 easyvqa:test images, prompt '{DEFAULT_CAPTION_PROMPT}'.",
        "",
        f"Machine load, `uptime` at the start: `{uptime_before}`; at the end: `{results['uptime_after']}`.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| test captions in the new style and right | {right}/{n} = {right / n:.4f} (in style: {in_style}) | >= 0.95 |",
        f"| adapter parameters / base parameters | {card['adapter_parameters']:,} / {card['base_parameters']:,} = "
        f"{100 * card['adapter_share']:.2f}% | <= 2% |",
        f"| training time (trainer) / whole finetune call | {card['train_seconds']:.0f} s / {seconds:.0f} s | <= 600 s |",
        f"| adapter off: answers equal to the base's | {same}/{len(base)} | all |",
        f"| VQA, first {args.check} test questions, right: adapter on / base | {vqa_right['adapter on']} / "
        f"{vqa_right['base']} | (information) |",
        "",
        "Examples: " + "; ".join(captions[:3]),
        "",
        "Captions not in the style or wrong (image (truth): caption), at most 20 shown:",
        "",
        *([f"- {w}" for w in wrong[:20]] or ["- none"]),
    ]
    write_report("finetune_lora", "LoRA fine-tuning benchmark", sections, {"results": results})
    print(json.dumps({k: v for k, v in results.items() if k not in ("wrong", "examples")}))


if __name__ == "__main__":
    main()
