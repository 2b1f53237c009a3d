"""Embedding precision benchmark: `vlmstack index build` with --dtype bfloat16 and
--quantize int8 against float32 and a plain float32 open_clip loop, whole process each,
side by side in one run; and how far the lower precisions move the neighbours.

    .venv/bin/python -m benchmarks.embed_precision [--images 512] [--repeats 3]

Model: open_clip ViT-B-32 with random weights saved to a file (no downloads here), given
as open_clip:ViT-B-32@FILE. Images: easyvqa:test pictures resized to 256 px, saved as
JPEG. Neighbours: for every image, its 10 nearest other images by cosine similarity of
the embeddings, compared with float32's (share of the 10 kept), for the ViT-B-32 and for
the trained clip-easyvqa. Also which scaled_dot_product_attention kernel each attention
path dispatches to on this CPU. Writes docs/benchmarks/embed_precision.md and .json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from PIL import Image

from benchmarks.common import write_report
from vlm.clip import load_clip
from vlm.data import easyvqa
from vlm.embedding import embed_images
from vlm.quantize import Precision

PRECISIONS = {"float32": Precision(), "bfloat16": Precision(dtype="bfloat16"), "int8": Precision(quantize="int8")}
# The plain float32 open_clip loop: what any script would write (open_clip's own transform).
OPEN_CLIP_LOOP = """
import sys, torch, open_clip
from pathlib import Path
from PIL import Image
torch.set_num_threads(2)
model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=sys.argv[1])
model.eval()
class Files(torch.utils.data.Dataset):
    def __init__(self, paths): self.paths = paths
    def __len__(self): return len(self.paths)
    def __getitem__(self, i): return preprocess(Image.open(self.paths[i]).convert("RGB"))
paths = sorted(Path(sys.argv[2]).glob("*.jpg"))
loader = torch.utils.data.DataLoader(Files(paths), batch_size=256, num_workers=2)
with torch.inference_mode():
    vectors = torch.cat([model.encode_image(batch, normalize=True) for batch in loader])
print(vectors.shape)
"""


def make_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for image in list(easyvqa.images("test"))[:count]:
        path = folder / (Path(image.path).stem + ".jpg")
        Image.open(image.path).convert("RGB").resize((256, 256), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - started


def neighbours(vectors: torch.Tensor, k: int = 10) -> torch.Tensor:
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-2)
    return similarity.topk(k, dim=1).indices


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / a.numel()


def sdpa_kernels() -> dict:
    """Attention kernels (aten ops) seen while llava-easyvqa and flamingo-easyvqa answer and clip-easyvqa embeds."""
    from torch.profiler import ProfilerActivity, profile

    from vlm.load import load_vlm

    picture = Image.open(easyvqa.images("test")[0].path)
    found = {}
    for name in ("llava-easyvqa", "flamingo-easyvqa", "clip-easyvqa"):
        model = load_clip(name) if name.startswith("clip") else load_vlm(name)
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
            if name.startswith("clip"):
                model.encode_images([picture]), model.encode_texts(["a red circle"])
            else:
                model.answer(picture, "what color is the shape?")
        ops = sorted({e.name for e in prof.events() if "attention" in e.name})
        found[name] = ops
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    vlmstack = [sys.executable, "-m", "vlm.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "jpegs", args.images)
        torch.manual_seed(0)
        weights = tmp / "vit-b-32.pt"
        torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)
        spec = f"open_clip:ViT-B-32@{weights}"
        runs = {
            "open_clip loop (float32)": [sys.executable, "-c", OPEN_CLIP_LOOP, str(weights), str(tmp / "jpegs")],
            **{
                f"index build --{'quantize' if name == 'int8' else 'dtype'} {name}": [
                    *vlmstack,
                    "index",
                    "build",
                    str(tmp / "jpegs"),
                    "--model",
                    spec,
                    *(["--quantize", "int8"] if name == "int8" else ["--dtype", name]),
                ]
                for name in PRECISIONS
            },
        }
        seconds = {name: [] for name in runs}
        for repeat in range(args.repeats):  # interleaved, so load changes hit every run alike
            for run, (name, command) in enumerate(runs.items()):
                out = ["--out", str(tmp / f"index-{repeat}-{run}")] if "index" in command else []
                seconds[name].append(wall(command + out))
        overlaps = {}
        for model in (spec, "clip-easyvqa"):
            vectors = {
                name: embed_images(load_clip(model, precision=p), [str(p_) for p_ in paths], progress=False).vectors
                for name, p in PRECISIONS.items()
            }
            reference = neighbours(vectors["float32"])
            label = "ViT-B-32 (random weights)" if model == spec else model
            overlaps[label] = {
                name: overlap(neighbours(v), reference) for name, v in vectors.items() if name != "float32"
            }
    kernels = sdpa_kernels()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    loop = medians["open_clip loop (float32)"]
    rows = [
        f"| {name} | {medians[name]:.1f} | {args.images / medians[name]:.1f} | {loop / medians[name]:.2f}x | "
        f"{', '.join(f'{s:.1f}' for s in seconds[name])} |"
        for name in runs
    ]
    load_after = os.getloadavg()
    sections = [
        f"{args.images} JPEGs (easyvqa:test at 256 px), model `open_clip:ViT-B-32@FILE` (random weights), whole "
        f"process each (start-up, model load, decoding, embedding; index build also writes the index), "
        f"{args.repeats} interleaved repeats, median. Load average (1/5/15 min) before: {load_before}, after: "
        f"{load_after} (the machine was shared: noisy).",
        "",
        "| run | median s | images/s | vs open_clip loop | all runs (s) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "clip-retrieval: not measured. `pip install clip-retrieval` would downgrade open_clip_torch (3.3 -> 2.32), "
        "transformers (5 -> 4.57) and numpy in this environment, and its open_clip loader fetches weights by "
        "pretrained tag from the hub, which this machine cannot reach.",
        "",
        "Top-10 neighbours (image to image, cosine) kept from float32's:",
        "",
        "| model | bfloat16 | int8 |",
        "|---|---|---|",
        *[f"| {m} | {o['bfloat16']:.4f} | {o['int8']:.4f} |" for m, o in overlaps.items()],
        "",
        "Attention kernels (aten ops seen by torch.profiler, float32):",
        "",
        *[f"- {name}: {', '.join(ops)}" for name, ops in kernels.items()],
    ]
    data = {"seconds": seconds, "medians": medians, "overlap": overlaps, "kernels": kernels}
    data.update(load_average_before=load_before, load_average_after=load_after)
    write_report("embed_precision", "Embedding precision benchmark", sections, data)
    print(json.dumps({"medians": medians, "overlap": overlaps}))


if __name__ == "__main__":
    main()
