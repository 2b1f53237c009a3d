"""Hazard folder benchmark: `vlmstack index build`, `index update`, `embed` and `caption` on
a folder of good easy-VQA images plus everything a user's folder may hold that is not a
readable image, against the same good images alone.

    .venv/bin/python -m benchmarks.hazards [--images 200] [--caption-model llava-easyvqa]

The hazards: a FIFO, a dangling symlink, a symlink loop, a file name that is not UTF-8
(latin-1 `caf\\xe9.png`), an empty file, a truncated PNG, text named .jpg, and a PNG whose
header claims 100,000 x 100,000 pixels. Each step runs the installed `vlmstack` command
(a subprocess, killed after --timeout s) and is scored on: exit code 0, every good image
processed (in the index, in the embeddings without an error, in the captions), every bad
entry named in the printed report, and time no more than 10 s above the clean folder's.
Writes docs/benchmarks/hazards.md and .json.
"""

import argparse
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from PIL import Image

from benchmarks.common import write_report
from retrieval import store
from vlm.data import easyvqa

VLMSTACK = str(Path(sys.executable).with_name("vlmstack"))
SLACK_SECONDS = 10  # the target: no run longer than the clean folder's plus this


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 1x1 PNG whose header (with a valid CRC) claims width x height pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length, type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC of type + 13 data bytes
    return bytes(data)


def make_folder(folder: Path, good: list[Path], *, hazards: bool) -> list[str]:
    """Copy the good images into `folder`, plus the hazards if asked. Returns the bad
    entries' names as a report prints them."""
    folder.mkdir(parents=True)
    for path in good:
        shutil.copy(path, folder / path.name)
    if not hazards:
        return []
    some_png = good[0].read_bytes()
    os.mkfifo(folder / "fifo.png")
    os.symlink(folder / "missing.png", folder / "dangling.png")
    os.symlink("loop.png", folder / "loop.png")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:
        f.write(some_png)
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(some_png[: len(some_png) // 2])
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "bomb.png").write_bytes(png_bomb())
    return [
        "fifo.png",
        "dangling.png",
        "loop.png",
        "caf\\xe9.png",
        "empty.png",
        "truncated.png",
        "text.jpg",
        "bomb.png",
    ]


def run(argv: list[str], timeout: float) -> dict:
    """Run the CLI; exit code, seconds, stdout and stderr (code None if it was killed)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [VLMSTACK, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        code = None
    return {"exit": code, "seconds": round(time.perf_counter() - started, 2), "stdout": out, "stderr": err}


def indexed(index: Path) -> set[str]:
    manifest = store.read_manifest(index)
    return {Path(path).name for path, *_ in store.read_data(index, manifest).files}


def embedded(emb: Path) -> set[str]:
    rows = [json.loads(line) for shard in sorted(emb.glob("*.jsonl")) for line in shard.read_text().splitlines()]
    return {Path(row["path"]).name for row in rows if "error" not in row}


def captioned(out: Path) -> set[str]:
    return {Path(json.loads(line)["image"]).name for line in out.read_text().splitlines() if line.strip()}


def steps(folder: Path, work: Path, caption_model: str) -> list[tuple[str, list[str], object]]:
    """(name, CLI arguments, what it processed: a function of nothing -> set of file names)."""
    index, emb, captions = work / "index", work / "emb", work / "captions.jsonl"
    return [
        ("index build", ["index", "build", str(folder), "--out", str(index)], lambda: indexed(index)),
        ("index update", ["index", "update", str(index)], lambda: indexed(index)),
        ("embed", ["embed", str(folder), "--out", str(emb)], lambda: embedded(emb)),
        (
            "caption",
            ["caption", str(folder), "--model", caption_model, "--out", str(captions)],
            lambda: captioned(captions),
        ),
    ]


def measure(label: str, step: tuple, good: set[str], bad: list[str], timeout: float) -> dict:
    """Run one step (on the folder named `label`) and score it."""
    name, argv, processed = step
    result = run(argv, timeout)
    try:
        done = processed()
    except Exception as e:  # what the step left cannot be read: nothing counts as processed
        done, result["unreadable_output"] = set(), str(e)
    result["good_processed"] = len(good & done)
    result["missing_good"] = sorted(good - done)
    result["bad_named"] = [b for b in bad if b in result["stdout"]]
    result["bad_not_named"] = [b for b in bad if b not in result["stdout"]]
    result["stdout_tail"] = result.pop("stdout").splitlines()[-12:]
    result["stderr_tail"] = [line for line in result.pop("stderr").splitlines() if "error" in line.lower()][-5:]
    print(
        f"{label:8s} {name:13s} exit {result['exit']}  {result['seconds']:6.1f} s  "
        f"good {result['good_processed']}/{len(good)}  bad named {len(result['bad_named'])}/{len(bad)}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="good easy-VQA train images in each folder")
    parser.add_argument("--caption-model", default="llava-easyvqa")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run counts as hung and is killed")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    good_paths = [Path(im.path) for im in easyvqa.images("train")[: args.images]]
    good = {path.name for path in good_paths}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "clean", good_paths, hazards=False)
        bad = make_folder(tmp / "hazards", good_paths, hazards=True)
        make_folder(tmp / "warm-up", good_paths[:1], hazards=False)
        for _, argv, _ in steps(tmp / "warm-up", tmp / "warm-up-out", args.caption_model):
            run(argv, args.timeout)  # the first run of each command reads the model from disk: not timed
        clean, hazard = {}, {}
        clean_steps = steps(tmp / "clean", tmp / "clean-out", args.caption_model)
        hazard_steps = steps(tmp / "hazards", tmp / "hazards-out", args.caption_model)
        for clean_step, hazard_step in zip(clean_steps, hazard_steps):  # interleaved: both see the same machine load
            clean[clean_step[0]] = measure("clean", clean_step, good, [], args.timeout)
            hazard[hazard_step[0]] = measure("hazards", hazard_step, good, bad, args.timeout)

    rows, verdicts = [], {}
    for name in clean:
        c, h = clean[name], hazard[name]
        extra = h["seconds"] - c["seconds"]
        ok = (
            h["exit"] == 0
            and c["exit"] == 0
            and h["good_processed"] == len(good)
            and not h["bad_not_named"]
            and extra <= SLACK_SECONDS
        )
        verdicts[name] = ok
        rows.append(
            f"| {name} | {c['exit']} | {c['seconds']:.1f} | {h['exit']} | {h['seconds']:.1f} | {extra:+.1f} | "
            f"{h['good_processed']}/{len(good)} | {len(h['bad_named'])}/{len(bad)} | {'yes' if ok else 'NO'} |"
        )
    sections = [
        f"{len(good)} good easy-VQA train images; the hazard folder adds {len(bad)} bad entries: {', '.join(bad)}.",
        f"Each step is the installed `vlmstack` command, run on the clean folder, then at once on the hazard folder. "
        f"Target: exit 0, every good image processed, every bad entry named in the printed report, "
        f"at most {SLACK_SECONDS} s more than the clean folder. Caption model: {args.caption_model}.",
        "",
        f"Times are whole commands: starting Python and loading the model take most of a short run "
        f"(each command is run once on a one-image folder first, untimed, so neither folder pays for a cold disk cache). "
        f"Load average {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on 2 cores "
        f"(other jobs shared the machine), so differences of a few seconds either way are noise.",
        "",
        "| step | clean exit | clean s | hazards exit | hazards s | extra s | good processed | bad named | target met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
    for name, h in hazard.items():
        if not verdicts[name]:
            sections += [
                f"**{name}** on the hazard folder: not named {h['bad_not_named']}, missing good {h['missing_good'][:5]}, "
                f"errors {h['stderr_tail']}",
                "",
            ]
    write_report(
        "hazards",
        "Hazard folder: index build, update, embed and caption",
        sections,
        {
            "good": len(good),
            "bad": bad,
            "slack_seconds": SLACK_SECONDS,
            "clean": clean,
            "hazards": hazard,
            "target_met": verdicts,
        },
    )


if __name__ == "__main__":
    main()
