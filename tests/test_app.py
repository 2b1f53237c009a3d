"""The web app, launched in-process and driven like a user would: gradio_client for the
three tabs, and a real headless Chromium for rendering. Uses the shipped models."""

import os
import shutil
import socket
import subprocess

import pytest
from gradio_client import Client, handle_file

from retrieval import Searcher, build_index
from tests.conftest import draw_shape
from vlm.data import easyvqa
from vlm.hub import shipped_names

pytestmark = pytest.mark.skipif(
    not {"clip-easyvqa", "llava-easyvqa", "flamingo-easyvqa"} <= set(shipped_names()), reason="shipped models missing"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from apps.gradio_app import launch

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))  # the demo index goes here
    app = launch(port=_free_port(), block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app.local_url, verbose=False)


def test_binds_to_localhost_only(app):
    assert app.server_name == "127.0.0.1"


def test_search_returns_gallery_items_of_the_right_kind(client):
    results = client.predict("a red circle", None, 5, api_name="/search")
    assert len(results) == 5
    captions = {os.path.basename(im.path): im.caption for im in easyvqa.images("test")}
    names = [item["caption"].split()[-1] for item in results]
    assert all(captions[name] == "a red circle" for name in names)
    assert all(os.path.isfile(item["image"]) for item in results)


def test_search_by_image_finds_itself_first(client):
    image = easyvqa.images("test")[7].path
    results = client.predict("", handle_file(image), 3, api_name="/search")
    assert results[0]["caption"].endswith(os.path.basename(image))


def test_empty_search_is_a_readable_error(client):
    with pytest.raises(Exception, match="Type a query"):
        client.predict("", None, 5, api_name="/search")


@pytest.mark.parametrize("model", ["llava-easyvqa", "flamingo-easyvqa"])
def test_a_chat_turn_about_an_easyvqa_image_is_answered_right(client, model):
    image = easyvqa.images("test")[3]
    reply = client.predict({"text": "what color is the shape?", "files": [handle_file(image.path)]}, model, api_name="/chat")
    assert reply.strip() == image.color


def test_caption_request_names_colour_and_shape(client):
    image = easyvqa.images("test")[5]
    table = client.predict([handle_file(image.path)], "llava-easyvqa", "Describe the image.", api_name="/caption")
    [[name, caption]] = table["data"]
    assert name == os.path.basename(image.path)
    assert image.color in caption and image.shape in caption


def test_typed_text_is_never_opened_as_a_file(tmp_path):
    from apps.gradio_app import history_to_turns

    secret = tmp_path / "secret.png"
    draw_shape("red", "circle").save(secret)
    turns, images = history_to_turns([{"role": "user", "content": [str(secret)]}])
    assert images == [] and turns == [("user", str(secret))]
    upload = {"type": "file", "file": {"path": str(secret)}}
    turns, images = history_to_turns([{"role": "user", "content": [upload, {"type": "text", "text": "what color?"}]}])
    assert images == [str(secret)] and turns == [("user", "<image>\nwhat color?")]


def test_search_serves_only_files_inside_the_indexed_folder(tmp_path, tiny_clip_dir):
    from apps.gradio_app import served_pictures

    folder = tmp_path / "pictures"
    folder.mkdir()
    draw_shape("red", "circle").save(folder / "red.png")
    draw_shape("blue", "rectangle").save(folder / "blue.png")
    draw_shape("green", "triangle").save(tmp_path / "private.png")
    (folder / "link.png").symlink_to(tmp_path / "private.png")
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    searcher = Searcher.open(tmp_path / "idx")
    hits = searcher.search_text("a red circle", k=10)
    assert len(hits) == 3
    served = served_pictures(searcher, hits)
    assert sorted(label.split()[-1] for _, label in served) == ["blue.png", "red.png"]


def _chromium() -> str | None:
    """Debian's chromium, installed here when missing (root with apt-get only)."""
    found = shutil.which("chromium")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=1200)
    return shutil.which("chromium")


def test_the_page_renders_in_a_real_browser(app, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium, and it cannot be installed here (needs root and apt-get)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", app.local_url], capture_output=True, text=True, timeout=180).stdout
    for text in ("vlmstack", "Search", "Chat", "Caption"):
        assert text in dom
