"""CLIP benchmark: clip-easyvqa on easyvqa:test, robustness to formats and sizes, and
image-encoding throughput against a plain one-image-at-a-time open_clip loop.

    .venv/bin/python -m benchmarks.clip [--model clip-easyvqa]

Writes docs/benchmarks/clip.md and clip.json.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import SIZES, VARIANTS, timed, write_report, write_variant
from vlm.clip import load_clip
from vlm.data.records import CaptionRecord
from vlm.data.sources import caption_records
from vlm.embedding import embed_images
from vlm.eval.clip import evaluate_clip
from vlm.hub import CARD_FILE, resolve_dir, update_card

KEYS = ("zeroshot_top1", "t2i_r1", "t2i_r5", "i2t_r1")


def variant_records(records, workdir: Path) -> dict[str, list[CaptionRecord]]:
    """Each test image re-saved in every variant format, at sizes cycling through SIZES."""
    out = {}
    for name, fmt, save_args, mode in VARIANTS:
        folder = workdir / name
        folder.mkdir()
        out[name] = []
        for i, record in enumerate(records):
            target = folder / f"{i:05d}.{fmt.lower()}"
            write_variant(record.image, target, fmt, save_args, mode, SIZES[i % len(SIZES)])
            out[name].append(CaptionRecord(str(target), record.caption))
    return out


def plain_open_clip_loop(clip, paths) -> float:
    """Seconds to encode `paths` the plain way: open, open_clip's torchvision preprocess,
    encode one image at a time."""
    import open_clip
    from PIL import Image

    preprocess = open_clip.image_transform(
        clip.image_size, is_train=False, mean=clip.config.image_mean, std=clip.config.image_std
    )
    model = clip.model
    _, seconds = timed(lambda: [model.encode_image(preprocess(Image.open(p).convert("RGB"))[None]) for p in paths])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--update-card", action="store_true", help="developers: record the figures in the shipped model's card"
    )
    parser.add_argument("--model", default="clip-easyvqa")
    args = parser.parse_args()
    torch.set_num_threads(2)
    clip = load_clip(args.model)
    records = caption_records("easyvqa:test")

    results = {"model": args.model, "original": evaluate_clip(clip, records, progress=False)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in variant_records(records, Path(tmp)).items():
            results[name] = evaluate_clip(clip, variant, progress=False)
    drops = {name: max(100 * (results["original"][k] - results[name][k]) for k in KEYS) for name, *_ in VARIANTS}

    paths = [r.image for r in records]
    with torch.inference_mode():
        embed_images(clip, paths[:256], progress=False)  # warm-up
        _, batched = timed(embed_images, clip, paths, progress=False)
        plain_open_clip_loop(clip, paths[:32])  # warm-up
        plain = plain_open_clip_loop(clip, paths)
    throughput = {"batched_images_per_s": len(paths) / batched, "plain_loop_images_per_s": len(paths) / plain}

    card_path = resolve_dir(args.model) / CARD_FILE if resolve_dir(args.model) else None
    card = json.loads(card_path.read_text()) if card_path and card_path.is_file() else {}
    rows = ["| images | " + " | ".join(KEYS) + " | worst drop (points) |", "|---|" + "---|" * (len(KEYS) + 1)]
    for name in ["original"] + [v[0] for v in VARIANTS]:
        drop = "" if name == "original" else f"{drops[name]:.2f}"
        rows.append(f"| {name} | " + " | ".join(f"{results[name][k]:.4f}" for k in KEYS) + f" | {drop} |")
    sections = [
        f"Model: `{args.model}` on `easyvqa:test` ({results['original']['n']} images, 24 distinct captions).",
        "",
        "## Accuracy, and the same images in other formats and sizes",
        "",
        f"Variants re-save each test image at a side cycling through {list(SIZES)} px; the loader resizes back "
        "to the model's input. Drop = largest fall over the four metrics, in points.",
        "",
        *rows,
        "",
        "## Training time",
        "",
        f"Recipe `{card.get('recipe', {}).get('arch', '?')}` trained in {card.get('train_seconds', '?')} s "
        f"of training-loop time ({card.get('command', 'see model_card.json')}).",
        "",
        "## Image encoding throughput (same model, same 1,000 PNG files, one run)",
        "",
        "| pipeline | images/s |",
        "|---|---|",
        f"| vlmstack `embed_images` (DataLoader decode workers, batch 256) | {throughput['batched_images_per_s']:.0f} |",
        f"| plain open_clip loop (open, torchvision preprocess, one image per forward) | {throughput['plain_loop_images_per_s']:.0f} |",
    ]
    write_report(
        "clip",
        "CLIP benchmark",
        sections,
        {
            "results": results,
            "drops_points": drops,
            "throughput": throughput,
            "train_seconds": card.get("train_seconds"),
        },
    )
    if args.update_card and resolve_dir(args.model) and card:
        update_card(
            resolve_dir(args.model),
            test_metrics={"data": "easyvqa:test", **results["original"]},
            test_metrics_command=f"python -m benchmarks.clip --model {args.model}",
        )
    print(json.dumps({"original": results["original"], "worst_drop_points": max(drops.values()), **throughput}))


if __name__ == "__main__":
    main()
