"""Helpers the benchmark scripts share: image variants, timing, writing results."""

import io
import json
import platform
import sys
import time
from pathlib import Path

from PIL import Image

from vlm.atomic import write_text
from vlm.hub import machine_info

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = ROOT / "docs" / "benchmarks"  # what the scripts write: NAME.md and NAME.json
# The ways one picture reaches a user: (name, PIL save format, extra save arguments, mode).
VARIANTS = [
    ("jpeg-q75", "JPEG", {"quality": 75}, "RGB"),
    ("webp-q80", "WEBP", {"quality": 80}, "RGB"),
    ("png-rgba", "PNG", {}, "RGBA"),
    ("png-palette", "PNG", {}, "P"),
]
SIZES = (96, 128, 160, 192, 224, 256)


def write_variant(source: str, target: Path, fmt: str, save_args: dict, mode: str, size: int) -> None:
    """Save `source` resized to size x size, converted to `mode`, in `fmt`."""
    image = Image.open(source).convert("RGB").resize((size, size), Image.BICUBIC)
    if mode == "P":
        image = image.convert("P", palette=Image.ADAPTIVE, colors=256)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    target.write_bytes(buffer.getvalue())


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def command_line() -> str:
    """How this run was started, as `python -m benchmarks.NAME ARGS`."""
    module = ".".join(Path(sys.argv[0]).resolve().relative_to(ROOT).with_suffix("").parts)
    return " ".join(["python", "-m", module, *sys.argv[1:]])


def write_report(name: str, title: str, sections: list[str], data: dict) -> None:
    """docs/benchmarks/NAME.md (human) and NAME.json (machine) with command and machine."""
    machine = machine_info()
    header = [
        f"# {title}",
        "",
        f"Command: `{command_line()}`",
        f"Machine: {machine['cpu_count']} CPUs ({machine['processor']}), torch {machine['torch']}, "
        f"{platform.python_implementation()} {platform.python_version()}. Date: {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    write_text(RESULTS / f"{name}.md", "\n".join(header + sections) + "\n")
    write_text(
        RESULTS / f"{name}.json", json.dumps({"command": command_line(), "machine": machine, **data}, indent=2) + "\n"
    )
