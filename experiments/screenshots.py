"""Save a screenshot of each tab of the web app to docs/screenshots/ ({search,chat,caption}.png),
each after a real request on the shipped models: a search, a chat example, a caption
run. Drives Debian's chromium with Playwright (never downloads a browser).

    .venv/bin/python experiments/screenshots.py [--out docs/screenshots]
"""

import argparse
import shutil
import socket
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from vlm.data import easyvqa

TIMEOUT = 120_000  # ms; the first search may build the demo index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium: apt-get install chromium")
    from apps.gradio_app import launch

    app = launch(port=free_port(), block=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT)
            page.goto(app.local_url)

            page.get_by_label("Query").fill("a red circle")
            page.get_by_role("button", name="Search", exact=True).click()
            expect(page.locator("#search-status")).to_contain_text("best score")
            page.locator("#results .thumbnail-item, #results button img").first.click()
            expect(page.locator("#match-note")).to_contain_text("by occlusion")
            page.keyboard.press("Escape")  # close the gallery's preview, keep the map
            page.wait_for_timeout(1500)  # thumbnails load
            page.screenshot(path=args.out / "search.png", full_page=True)

            page.get_by_role("tab", name="Chat").click()
            page.get_by_text("Examples (click one)").locator("..").locator("button, tr, .gallery-item").first.click()
            expect(page.locator("#chatbot")).to_contain_text("— llava-easyvqa")
            page.locator("#chat-explain input").check()
            page.locator("#chat-input input[type=file]").set_input_files([easyvqa.images("test")[8].path])
            page.locator("#chat-input textarea").fill("what shape is it?")
            page.locator("#chat-send").click()
            expect(page.locator("#chat-status")).to_contain_text("Where the model looked")
            page.wait_for_timeout(1500)
            page.screenshot(path=args.out / "chat.png", full_page=True)

            page.get_by_role("tab", name="Caption").click()
            pictures = [p.path for p in easyvqa.images("test")[:6]]
            page.locator("#caption-files input[type=file]").set_input_files(pictures)
            page.get_by_role("button", name="Caption", exact=True).click()
            expect(page.get_by_text("6 of 6 captioned")).to_be_visible()
            page.wait_for_timeout(1500)
            page.screenshot(path=args.out / "caption.png", full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"saved {', '.join(str(args.out / n) for n in ('search.png', 'chat.png', 'caption.png'))}")


if __name__ == "__main__":
    main()
