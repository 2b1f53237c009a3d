"""App benchmark: 50 concurrent searches through gradio_client, and a screenshot of each
tab taken in a real headless browser.

    .venv/bin/pip install playwright        # drives Debian's chromium (apt-get install chromium)
    .venv/bin/python -m benchmarks.app

Writes docs/benchmarks/app.md and .json, and docs/screenshots/{search,chat,caption}.png.
"""

import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import tempfile
import time

from gradio_client import Client

from apps.gradio_app import launch
from benchmarks.common import RESULTS, write_report
from vlm.data import easyvqa

SCREENSHOTS = RESULTS.parent / "screenshots"
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


def screenshots(url: str) -> tuple[list[str], list[str]]:
    """A screenshot of each tab after using it; (files, problems). A step that fails is
    reported and the screenshot still taken, so a changed selector cannot hide the page."""
    from playwright.sync_api import sync_playwright

    image = easyvqa.images("test")[3]
    taken, problems = [], []

    def step(name: str, action) -> None:
        try:
            action()
        except Exception as e:  # a selector or timeout: report it, keep the screenshot
            problems.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}")

    def search(page):
        page.get_by_label("Query").fill("a red circle")
        page.get_by_role("button", name="Search").click()
        page.wait_for_selector(".gallery-item img, button.thumbnail-item img, .thumbnail-item img", timeout=30000)

    def chat(page):
        page.locator("input[type=file]").nth(1).set_input_files(image.path)
        time.sleep(1)
        page.get_by_placeholder("Attach images and ask about them").fill("what color is the shape?")
        page.keyboard.press("Enter")
        page.wait_for_selector(".bot, [data-testid=bot]", timeout=60000)

    def caption(page):
        page.locator("input[type=file]").nth(2).set_input_files([im.path for im in easyvqa.images("test")[:4]])
        time.sleep(2)
        page.get_by_role("button", name="Caption", exact=True).click()
        time.sleep(8)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        for tab, action in (("Search", search), ("Chat", chat), ("Caption", caption)):
            if tab != "Search":
                step(f"{tab} tab", lambda: page.get_by_role("tab", name=tab).click())
            step(tab, lambda: action(page))
            time.sleep(2)
            page.screenshot(path=SCREENSHOTS / f"{tab.lower()}.png", full_page=True)
            taken.append(f"{tab.lower()}.png")
        browser.close()
    return taken, problems


def main() -> None:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()  # a fresh demo index
    app = launch(port=free_port(), block=False)
    try:
        Client(app.local_url, verbose=False).predict("a red circle", None, 10, api_name="/search")  # warm-up
        load = concurrent_searches(app.local_url)
        shots, problems = screenshots(app.local_url)
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
        *([""] + [f"Problem while driving the page: {p}" for p in problems] if problems else []),
    ]
    write_report("app", "App benchmark", sections, {"load": load, "screenshots": shots, "problems": problems})
    print(json.dumps(load))


if __name__ == "__main__":
    main()
