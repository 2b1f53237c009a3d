"""App hardening benchmark: concurrent chats answer as they do alone, and requests naming
models the app does not offer leave its memory where it was.

    .venv/bin/python -m benchmarks.app_concurrency [--chats 40] [--custom 200]

For each shipped VQA model: `--chats` one-image chats ("what color is the shape?"), each from
a fresh gradio_client session, first one at a time, then all at once; counts errors and
answers that differ. Then `--custom` chats naming models by paths the app does not offer
(the shipped model's directory with 1..N extra slashes, and other paths), and the server's
resident memory and loaded models before and after. Writes docs/benchmarks/app_concurrency.md and .json.
"""

import argparse
import concurrent.futures
import socket
import time
from pathlib import Path

from gradio_client import Client, handle_file

from apps.gradio_app import launch, vqa_model_names
from benchmarks.common import write_report
from vlm.data import easyvqa
from vlm.hub import WEIGHTS_DIR

QUESTION = "what color is the shape?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib() -> float:
    """This process's resident memory (the app runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ask(url: str, model: str, image: str) -> str:
    """One chat from a fresh session; the error's type and message if it fails."""
    try:
        return Client(url, verbose=False).predict(
            {"text": QUESTION, "files": [handle_file(image)]}, model, api_name="/chat"
        )
    except Exception as e:
        return f"ERROR {type(e).__name__}: {e}"


def concurrent_chats(url: str, model: str, images: list[str]) -> dict:
    alone = [ask(url, model, image) for image in images]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        together = list(pool.map(lambda image: ask(url, model, image), images))
    seconds = time.perf_counter() - started
    return {
        "model": model,
        "chats": len(images),
        "errors": sum(answer.startswith("ERROR") for answer in together),
        "errors_alone": sum(answer.startswith("ERROR") for answer in alone),
        "differing": sum(a != b for a, b in zip(alone, together)),
        "concurrent_seconds": round(seconds, 1),
    }


def custom_models(url: str, app, image: str, count: int) -> dict:
    base = str(WEIGHTS_DIR / "llava-easyvqa")
    names = [base + "/" * (1 + i % 40) if i % 2 == 0 else f"/tmp/../{base}/./{'x/..' * (i % 7)}" for i in range(count)]
    before, loaded_before = rss_mib(), app.models.loaded()
    refused = sum(ask(url, name, image).startswith("ERROR") for name in names)
    return {
        "requests": count,
        "refused": refused,
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(rss_mib(), 1),
        "models_loaded_before": loaded_before,
        "models_loaded_after": app.models.loaded(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=40)
    parser.add_argument("--custom", type=int, default=200)
    args = parser.parse_args()
    app = launch(port=free_port(), block=False)
    url = app.local_url
    images = [im.path for im in easyvqa.images("test")[: args.chats]]
    try:
        chats = [concurrent_chats(url, model, images) for model in vqa_model_names()]
        custom = custom_models(url, app, images[0], args.custom)
    finally:
        app.close()
    rows = [
        f"| {c['model']} | {c['chats']} | {c['errors']} | {c['differing']} | {c['concurrent_seconds']} |" for c in chats
    ]
    sections = [
        f"## {args.chats} concurrent one-image chats, each from a fresh session, against the same chats one at a time",
        "",
        "| model | chats | errors | answers differing from one-at-a-time | seconds for all at once |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"## {args.custom} chats naming models the app does not offer",
        "",
        f"Refused: {custom['refused']} of {custom['requests']}. Server resident memory {custom['rss_before_mib']} MiB before, "
        f"{custom['rss_after_mib']} MiB after; models loaded before {custom['models_loaded_before']}, after {custom['models_loaded_after']} "
        "(the bound is 2).",
    ]
    write_report(
        "app_concurrency",
        "App: concurrent chats and refused model names",
        sections,
        {"chats": chats, "custom_models": custom},
    )


if __name__ == "__main__":
    main()
