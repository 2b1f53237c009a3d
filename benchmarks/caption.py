"""Captioning benchmark: do captions of the easy-VQA test images name the right colour and
shape, and how much does batching speed captioning up?

    .venv/bin/python -m benchmarks.caption [--models llava-easyvqa flamingo-easyvqa]

Runs `vlmstack caption`'s code path (apps.caption.caption_folder) on a copy of the 1,000
test images. A caption is right when it contains the image's colour and shape words and
no other colour or shape word. Writes docs/benchmarks/caption.md and .json.
"""

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from apps.caption import caption_folder
from benchmarks.common import timed, write_report
from vlm.data import easyvqa
from vlm.load import load_vlm


def names_right(caption: str, color: str, shape: str) -> bool:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return words & set(easyvqa.COLORS) == {color} and words & set(easyvqa.SHAPES) == {shape}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llava-easyvqa", "flamingo-easyvqa"])
    parser.add_argument(
        "--single-images", type=int, default=200, help="images captioned at batch 1 for the speed comparison"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    truth = {Path(im.path).name: im for im in easyvqa.images("test")}
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        shutil.copytree(easyvqa.image_dir("test"), folder)
        small = Path(tmp) / "small"
        small.mkdir()
        for name in sorted(truth)[: args.single_images]:
            shutil.copy(folder / name, small / name)
        for name in args.models:
            model = load_vlm(name)
            out = Path(tmp) / f"{name}.jsonl"
            report, seconds = timed(caption_folder, folder, model=model, out=out, batch_size=16, progress=False)
            captions = [json.loads(line) for line in out.read_text().splitlines()]
            wrong = []
            for c in captions:
                image = truth[Path(c["image"]).name]
                if not names_right(c["caption"], image.color, image.shape):
                    wrong.append(f"{Path(c['image']).name} ({image.color} {image.shape}): {c['caption']}")
            right = len(captions) - len(wrong)
            model._feature_cache.clear()
            timed(caption_folder, small, model=model, out=Path(tmp) / "warm.jsonl", batch_size=16, progress=False)
            for batch in (1, 16):
                model._feature_cache.clear()
                _, speed_seconds = timed(
                    caption_folder,
                    small,
                    model=model,
                    out=Path(tmp) / f"{name}-{batch}.jsonl",
                    batch_size=batch,
                    progress=False,
                )
                results.setdefault(name, {})[f"batch_{batch}_images_per_s"] = args.single_images / speed_seconds
            examples = [f"{c['image'].split('/')[-1]}: {c['caption']}" for c in captions[:3]]
            results[name].update(
                {
                    "images": len(captions),
                    "right": right,
                    "accuracy": right / len(captions),
                    "seconds": seconds,
                    "examples": examples,
                    "wrong": wrong,
                }
            )
            r = results[name]
            rows.append(
                f"| `{name}` | {r['right']}/{r['images']} = {r['accuracy']:.4f} | {r['batch_1_images_per_s']:.1f} | "
                f"{r['batch_16_images_per_s']:.1f} ({r['batch_16_images_per_s'] / r['batch_1_images_per_s']:.1f}x) |"
            )
    sections = [
        "Prompt: 'Describe the image.' (the default). Accuracy over all 1,000 easyvqa:test images; speed on the first "
        f"{args.single_images}, both batch sizes in the same run, features computed afresh for each.",
        "",
        "| model | captions naming the right colour and shape | images/s at batch 1 | images/s at batch 16 |",
        "|---|---|---|---|",
        *rows,
    ]
    for name, r in results.items():
        sections += ["", f"Examples from `{name}`: " + "; ".join(r["examples"][:2])]
        sections += ["", f"Wrong captions from `{name}` (image (truth): caption), at most 20 shown:", ""]
        sections += [f"- {w}" for w in r["wrong"][:20]] or ["- none"]
    write_report("caption", "Captioning benchmark", sections, {"results": results})
    print(json.dumps({k: {"accuracy": v["accuracy"]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
