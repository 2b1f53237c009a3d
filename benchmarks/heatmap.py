"""How long "where the model looked" takes: occlusion maps (apps/heatmap.py) for the
shipped LLaVA and Flamingo answers and for CLIP search hits, on 64 px easy-VQA test
pictures, beside the plain answer they explain; also on JPEG copies of the pictures, whose
noisy background leaves no cell to skip (the cost on photographs). Writes
docs/benchmarks/heatmap.md/.json.

    python -m benchmarks.heatmap [--pictures 20]
"""

import argparse
import io
import json
import os
import statistics

import torch
from PIL import Image

from apps.heatmap import answer_saliency, match_saliency
from benchmarks.common import timed, write_report
from vlm import load_vlm
from vlm.clip import load_clip
from vlm.data import easyvqa
from vlm.images import load_image

TARGET_SECONDS = 1.0


def jpeg_copy(picture: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=75)
    return Image.open(buffer).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    items = easyvqa.images("test")[: args.pictures]
    pictures = [load_image(item.path) for item in items]
    jpegs = [jpeg_copy(picture) for picture in pictures]
    seconds: dict[str, list[float]] = {}
    for name in ("llava-easyvqa", "flamingo-easyvqa"):
        model = load_vlm(name)
        model.answer(pictures[0], "what shape is it?")  # warm-up
        answers = seconds.setdefault(f"{name} answer", [])
        maps = seconds.setdefault(f"{name} answer heatmap", [])
        full_maps = seconds.setdefault(f"{name} answer heatmap, JPEG copy (all 64 cells)", [])
        for item, picture, jpeg in zip(items, pictures, jpegs):
            answers.append(timed(model.answer, picture, "what shape is it?")[1])
            maps.append(timed(answer_saliency, model, picture, "what shape is it?", item.shape)[1])
            full_maps.append(timed(answer_saliency, model, jpeg, "what shape is it?", item.shape)[1])
    clip = load_clip("clip-easyvqa")
    searches = seconds.setdefault("clip-easyvqa query embedding", [])
    maps = seconds.setdefault("clip-easyvqa search-hit heatmap", [])
    full_maps = seconds.setdefault("clip-easyvqa search-hit heatmap, JPEG copy (all 64 cells)", [])
    for item, picture, jpeg in zip(items, pictures, jpegs):
        vector, took = timed(lambda text: clip.encode_texts([text]).numpy()[0], f"a {item.color} {item.shape}")
        searches.append(took)
        maps.append(timed(match_saliency, clip, picture, vector)[1])
        full_maps.append(timed(match_saliency, clip, jpeg, vector)[1])
    load_after = os.getloadavg()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    rows = [
        f"| {name} | {medians[name] * 1000:.0f} | {max(values) * 1000:.0f} | "
        + ("" if "heatmap" not in name else ("yes" if medians[name] <= TARGET_SECONDS else "**no**"))
        + " |"
        for name, values in seconds.items()
    ]
    sections = [
        f"{args.pictures} easy-VQA test pictures (64×64 PNG), one at a time, 2 torch threads, float32. A heatmap is "
        "one batch: the picture and a copy per cell of the 8×8 grid with that cell painted over, leaving out cells "
        "already all of the background colour (on these pictures most of them). The JPEG rows use a quality-75 copy "
        "of each picture, whose background is noisy: all 64 copies run, as for a photograph. The answer and query "
        f"rows are what the app does without the heatmap. Target: a heatmap ≤ {TARGET_SECONDS:g} s. "
        f"Load average (1/5/15 min) before: {load_before}, after: {load_after}.",
        "",
        "| step | median ms | max ms | heatmap ≤ 1 s |",
        "|---|---|---|---|",
        *rows,
        "",
        "The heatmap runs only when asked for (the Chat tab's toggle, a click on a search result), after the "
        "answer or the results are shown: normal answers and searches do not wait for it.",
    ]
    data = {
        "seconds": seconds,
        "medians": medians,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    write_report("heatmap", "Heatmap (where the model looked) benchmark", sections, data)
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
