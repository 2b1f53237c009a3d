"""App benchmark: 50 concurrent searches through gradio_client, and a screenshot of each
tab taken in a real headless browser.

    .venv/bin/pip install playwright        # drives Debian's chromium (apt-get install chromium)
    .venv/bin/python docs/benchmarks/app.py

Writes docs/benchmarks/app.md and .json, and docs/screenshots/{search,chat,caption}.png.
"""

import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import HERE, write_report  # noqa: E402

from apps.gradio_app import launch  # noqa: E402
from gradio_client import Client  # noqa: E402
from vlm.data import easyvqa  # noqa: E402

SCREENSHOTS = HERE.parent / "screenshots"
QUERIES = sorted({im.caption for im in easyvqa.images("test")})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def concurrent_searches(url: str, count: int = 50) -> dict:
    """`count` searches fired at once, each from its own client, as separate users would."""
    clients = [Client(url, verbose=False) for _ in range(count)]

    def one(i: int) -> tuple[bool, float]:
        started = time.perf_counter()
        try:
            results = clients[i].predict(QUERIES[i % len(QUERIES)], None, 10, api_name="/search")
            return len(results) == 10, time.perf_counter() - started
        except Exception:
            return False, time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(one, range(count)))
    latencies = sorted(1000 * t for _, t in outcomes)
    return {
        "requests": count,
        "succeeded": sum(ok for ok, _ in outcomes),
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[int(0.95 * (count - 1))],
        "max_ms": latencies[-1],
    }


def screenshots(url: str) -> list[str]:
    from playwright.sync_api import sync_playwright

    image = easyvqa.images("test")[3]
    taken = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_label("Query").fill("a red circle")
        page.get_by_role("button", name="Search").click()
        page.wait_for_selector(".gallery-item img, button.thumbnail-item img", timeout=30000)
        time.sleep(1)
        page.screenshot(path=SCREENSHOTS / "search.png", full_page=True)
        taken.append("search.png")

        page.get_by_role("tab", name="Chat").click()
        page.locator("input[type=file]").nth(1).set_input_files(image.path)
        time.sleep(1)
        page.get_by_placeholder("Attach images and ask about them").fill("what color is the shape?")
        page.keyboard.press("Enter")
        page.wait_for_selector(".bot, [data-testid=bot]", timeout=60000)
        time.sleep(3)
        page.screenshot(path=SCREENSHOTS / "chat.png", full_page=True)
        taken.append("chat.png")

        page.get_by_role("tab", name="Caption").click()
        page.locator("input[type=file]").nth(2).set_input_files([im.path for im in easyvqa.images("test")[:4]])
        time.sleep(2)
        page.get_by_role("button", name="Caption", exact=True).click()
        time.sleep(8)
        page.screenshot(path=SCREENSHOTS / "caption.png", full_page=True)
        taken.append("caption.png")
        browser.close()
    return taken


def main() -> None:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()  # a fresh demo index
    app = launch(port=free_port(), block=False)
    try:
        Client(app.local_url, verbose=False).predict("a red circle", None, 10, api_name="/search")  # warm-up
        load = concurrent_searches(app.local_url)
        shots = screenshots(app.local_url)
    finally:
        app.close()
    sections = [
        "The app as `vlmstack app` starts it (shipped models, demo index of the 1,000 easy-VQA test images, "
        "queue concurrency 2), on this machine; each request from its own gradio_client.",
        "",
        "| requests at once | succeeded | p50 latency | p95 latency | slowest |",
        "|---|---|---|---|---|",
        f"| {load['requests']} | {load['succeeded']} | {load['p50_ms']:.0f} ms | {load['p95_ms']:.0f} ms | {load['max_ms']:.0f} ms |",
        "",
        "Latency is from submitting to receiving the gallery, queueing included: 50 requests share 2 workers.",
        "",
        "## Screenshots (headless Chromium)",
        "",
        *[f"![{name}](../screenshots/{name})" for name in shots],
    ]
    write_report("app", "App benchmark", sections, {"load": load, "screenshots": shots})
    print(json.dumps(load))


if __name__ == "__main__":
    main()
