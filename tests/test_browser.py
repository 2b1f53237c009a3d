"""The web app's flows in a real browser: Playwright for Python driving Debian's chromium
(through `executable_path`; no browser is ever downloaded). Each test is a flow a user
follows and that once failed: chat after an error, Stop, the examples, the search
scroll, the caption download."""

import csv
import json
import os
import threading
import time

import pytest

from tests.helpers import draw_shape, free_port
from tests.test_app import _chromium
from vlm.data import easyvqa
from vlm.hub import shipped_names

pytestmark = pytest.mark.skipif(
    not {"clip-easyvqa", "llava-easyvqa"} <= set(shipped_names()), reason="shipped models missing"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
TIMEOUT = 60_000  # ms: this machine's two cores are often shared
sync_api.expect.set_options(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from apps.gradio_app import launch

    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))  # the first search builds the demo index
    app = launch(port=free_port(), block=False)
    yield app
    app.close()
    if saved is not None:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium, and it cannot be installed here (needs root and apt-get)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(app, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(app.local_url)
    yield page
    context.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _ask(page, text: str, files: list[str] = ()) -> None:
    if files:
        page.locator("#chat-input input[type=file]").set_input_files(list(files))
        page.locator("#chat-input img, #chat-input .thumbnail-item").first.wait_for()
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()


def _answers(page):
    return page.locator("#chatbot .message-row.bot-row, #chatbot [data-testid=bot]")


def test_chat_answers_after_errors(page, tmp_path):
    _tab(page, "Chat")
    page.locator("#chat-send").click()  # nothing typed
    sync_api.expect(page.locator("#chat-status")).to_contain_text("Ask a question")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not a picture")
    _ask(page, "what color is the shape?", [str(text_file)])
    status = page.locator("#chat-status")
    sync_api.expect(status).to_contain_text("notes.png")
    assert str(tmp_path) not in status.inner_text() and "/tmp" not in status.inner_text()
    picture = easyvqa.images("test")[3]
    page.locator("#chat-input textarea").fill("")
    page.locator("#chat-input button[aria-label*=emove], #chat-input .delete-button").first.click(timeout=5000)
    _ask(page, "what color is the shape?", [picture.path])
    sync_api.expect(page.locator("#chatbot")).to_contain_text("— llava-easyvqa")
    assert picture.color in _answers(page).last.inner_text()
    sync_api.expect(status).to_have_text("")
    _ask(page, "hello, what can you do?")  # no picture in a new chat: a notice, not a guess
    page.locator("#chat-clear").click()
    sync_api.expect(_answers(page)).to_have_count(0)
    _ask(page, "hello, what can you do?")
    sync_api.expect(page.locator("#chatbot")).to_contain_text("trained only on questions about a picture")


class SlowModel:
    """Streams 200 words, one every 50 ms, counting those the app took."""

    def __init__(self):
        self.taken, self.lock = 0, threading.Lock()

    def chat(self, turns, images, *, stream, **generation):
        for _ in range(200):
            time.sleep(0.05)
            with self.lock:
                self.taken += 1
            yield "word "


def test_stop_ends_a_long_generation_on_the_server(page, app, monkeypatch):
    slow = SlowModel()
    monkeypatch.setattr(app.models, "get", lambda name: slow)
    _tab(page, "Chat")
    _ask(page, "what color is the shape?", [easyvqa.images("test")[0].path])
    sync_api.expect(page.locator("#chatbot")).to_contain_text("word word")
    page.locator("#chat-stop").click()
    sync_api.expect(page.locator("#chat-status")).to_contain_text("Stopped")
    time.sleep(1.0)
    stopped_at = slow.taken
    time.sleep(2.0)
    assert slow.taken == stopped_at < 150  # the server stopped generating, long before the end
    monkeypatch.undo()
    _ask(page, "what shape is it?", [easyvqa.images("test")[1].path])  # and the chat still works
    sync_api.expect(page.locator("#chatbot")).to_contain_text(easyvqa.images("test")[1].shape)


def test_the_model_panel_and_examples_work(page):
    _tab(page, "Chat")
    panel = page.locator(".panel").filter(has_text="llava-easyvqa").first
    for fact in ("64×64", "8 colours", "triangle", "Measured accuracy"):
        sync_api.expect(panel).to_contain_text(fact)
    page.locator("#chatbot").scroll_into_view_if_needed()
    page.get_by_text("Examples (click one)").locator("..").locator("button, tr, .gallery-item").first.click()
    first = easyvqa.images("test")[0]
    sync_api.expect(page.locator("#chatbot")).to_contain_text("— llava-easyvqa")
    assert first.color in _answers(page).last.inner_text()


def _scrolled(page) -> int:
    return page.evaluate(
        """() => Math.max(window.scrollY, ...[document.getElementById("results"),
            ...document.querySelectorAll("#results *")].map(e => e.scrollTop))"""
    )


def test_a_new_search_starts_at_the_top(page):
    query = page.get_by_label("Query")
    query.fill("a red circle")
    page.get_by_role("button", name="Search", exact=True).click()
    sync_api.expect(page.get_by_text("Building the demo index")).to_be_visible()  # the first search
    sync_api.expect(page.locator("#search-status")).to_contain_text("results", timeout=120_000)
    page.evaluate(
        """() => { for (const e of [document.getElementById("results"),
            ...document.querySelectorAll("#results *")]) e.scrollTop = e.scrollHeight; window.scrollTo(0, 1e6); }"""
    )
    assert _scrolled(page) > 0
    query.fill("a blue triangle")
    before = page.locator("#search-status").inner_text()
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_function(
        "old => { const t = document.getElementById('search-status').innerText; return t !== old && t.includes('best') }",
        arg=before,
    )
    page.wait_for_timeout(500)
    top = page.locator("#results").bounding_box()["y"]
    assert 0 <= top < 900
    assert page.evaluate(
        """() => [document.getElementById("results"), ...document.querySelectorAll("#results *")]
            .every(e => e.scrollTop === 0)"""
    )
    query.fill("redd cirle")
    page.get_by_role("button", name="Search", exact=True).click()
    sync_api.expect(page.locator("#search-status")).to_contain_text("No close match")
    query.fill("a dog on a beach")  # fluent, but words the model never saw: it scores 0.90
    page.get_by_role("button", name="Search", exact=True).click()
    sync_api.expect(page.locator("#search-status")).to_contain_text("never saw “dog”, “on”, “beach”")
    page.get_by_role("button", name="2:yellow + rectangle").click()  # an example query runs
    sync_api.expect(page.locator("#search-status")).to_contain_text("results · best score")
    assert page.get_by_label("Query").input_value() == "2:yellow + rectangle"


def test_caption_download_has_every_caption(page, tmp_path):
    _tab(page, "Caption")
    pictures = []
    for colour, shape in [("red", "circle"), ("blue", "rectangle")]:
        pictures.append(tmp_path / f"{colour}.png")
        draw_shape(colour, shape).save(pictures[-1])
    page.locator("#caption-files input[type=file]").set_input_files([str(p) for p in pictures])
    page.get_by_role("button", name="Caption", exact=True).click()
    sync_api.expect(page.get_by_text("2 of 2 captioned")).to_be_visible()
    with page.expect_download() as download:
        page.locator("#download-csv").click()
    rows = list(csv.DictReader(open(download.value.path())))
    assert [r["image"] for r in rows] == ["red.png", "blue.png"]
    assert "red" in rows[0]["caption"] and "circle" in rows[0]["caption"]


def test_a_question_without_a_picture_to_an_image_only_model_gets_a_notice(app):
    from gradio_client import Client

    reply = Client(app.local_url, verbose=False).predict(
        {"text": "hello, what can you do?", "files": []}, "flamingo-easyvqa", api_name="/chat"
    )
    assert "trained only on questions about a picture" in reply


def test_the_model_panel_reads_the_card():
    import json

    from apps.model_panel import ModelFacts
    from vlm.hub import WEIGHTS_DIR

    facts = ModelFacts("llava-easyvqa")
    card = json.loads((WEIGHTS_DIR / "llava-easyvqa" / "model_card.json").read_text())
    assert facts.image_only and facts.image_size == 64
    assert f"{card['test_metrics']['accuracy']:.1%}" in facts.markdown()


def test_a_pipeline_whose_phases_name_the_data_is_read_as_trained_on_it(tmp_path):
    from apps.model_panel import ModelFacts

    (tmp_path / "config.json").write_text(json.dumps({"kind": "llava"}))
    recipe = {"phases": [{"name": "a", "data": "easyvqa:train"}, {"name": "b", "data": "my-captions.jsonl"}]}
    (tmp_path / "model_card.json").write_text(json.dumps({"kind": "llava", "recipe": recipe}))
    facts = ModelFacts("mine", str(tmp_path))
    assert facts.sources == ["easyvqa:train", "my-captions.jsonl"] and not facts.image_only
    recipe["phases"].pop()
    (tmp_path / "model_card.json").write_text(json.dumps({"kind": "llava", "recipe": recipe}))
    assert ModelFacts("mine", str(tmp_path)).image_only


def test_words_an_easyvqa_model_never_saw_are_named():
    from apps.model_panel import ModelFacts

    assert ModelFacts("clip-easyvqa").unknown_words("2:Red circle - a dog on the beach") == [
        "dog",
        "on",
        "the",
        "beach",
    ]
    assert ModelFacts("clip-easyvqa").unknown_words("a blue triangle - gray + 3:yellow") == []
    assert ModelFacts("no-such-model").unknown_words("a dog") == []  # nothing known about it: no claim


def test_where_the_model_looked_shows_a_heatmap_on_demand(page):
    _tab(page, "Chat")
    page.locator("#chat-explain input").check()
    picture = easyvqa.images("test")[8]
    _ask(page, "what shape is it?", [picture.path])
    sync_api.expect(page.locator("#chat-status")).to_contain_text("Where the model looked, by occlusion")
    sync_api.expect(page.locator("#chatbot")).to_contain_text(f"{picture.shape}\n\n— llava-easyvqa")
    sync_api.expect(page.locator("#chatbot").locator(".bot-row img, [data-testid=bot] img")).to_have_count(1)


def test_clicking_a_search_result_shows_where_it_matches(page):
    page.get_by_label("Query").fill("a green circle")
    page.get_by_role("button", name="Search", exact=True).click()
    sync_api.expect(page.locator("#search-status")).to_contain_text("results", timeout=120_000)
    page.locator("#results .thumbnail-item, #results button img").first.click()
    sync_api.expect(page.locator("#match-note")).to_contain_text("by occlusion")
    sync_api.expect(page.locator("#match-map img")).to_have_count(1)
