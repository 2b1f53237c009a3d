"""The web app, launched in-process and driven like a user would: gradio_client for the
three tabs, and a real headless Chromium for rendering. Uses the shipped models."""

import os
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from retrieval import Searcher, build_index
from tests.helpers import draw_shape, free_port
from vlm.data import easyvqa
from vlm.errors import VlmError
from vlm.hub import WEIGHTS_DIR, shipped_names

pytestmark = pytest.mark.skipif(
    not {"clip-easyvqa", "llava-easyvqa", "flamingo-easyvqa"} <= set(shipped_names()), reason="shipped models missing"
)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from apps.gradio_app import launch

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))  # the demo index goes here
    app = launch(port=free_port(), block=False)
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
    reply = client.predict(
        {"text": "what color is the shape?", "files": [handle_file(image.path)]}, model, api_name="/chat"
    )
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
    served, paths = served_pictures(searcher, hits)
    assert sorted(label.split()[-1] for _, label in served) == ["blue.png", "red.png"]
    assert sorted(Path(p).name for p in paths) == ["blue.png", "red.png"]  # the hits the pictures show


def _call(app, api_name: str, data: list, *, headers: dict | None = None, timeout: float = 60) -> tuple[str, str]:
    """A raw Gradio API call over HTTP, as any program could make it: (event, data) of the
    result ("complete" or "error")."""
    base = app.local_url.rstrip("/")
    posted = httpx.post(
        f"{base}/gradio_api/call/{api_name}", json={"data": data}, headers=headers or {}, timeout=timeout
    )
    posted.raise_for_status()
    result = httpx.get(f"{base}/gradio_api/call/{api_name}/{posted.json()['event_id']}", timeout=timeout).text
    events = [line.removeprefix("event: ") for line in result.splitlines() if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in result.splitlines() if line.startswith("data: ")]
    return events[-1], payloads[-1]


def test_search_api_refuses_a_server_file_named_in_the_payload(app, tmp_path):
    secret = tmp_path / "secret.png"
    draw_shape("red", "circle").save(secret)
    event, data = _call(app, "search", ["", {"path": str(secret)}, 3])
    assert event == "error" and "not a file uploaded" in data and str(tmp_path) not in data
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    event, data = _call(app, "search", ["", {"path": str(fifo)}, 3], timeout=20)  # would block a worker if opened
    assert event == "error"


def test_chat_refuses_unknown_models_without_loading_or_probing_them(app, client):
    image = easyvqa.images("test")[0].path
    weights = os.path.join(os.path.dirname(image), "..")
    before = app.models.loaded()
    for name in [str(WEIGHTS_DIR / "llava-easyvqa") + "//", "/etc", weights]:
        with pytest.raises(Exception, match="unknown model|not in the list of choices") as error:
            client.predict({"text": "what color is the shape?", "files": [handle_file(image)]}, name, api_name="/chat")
        assert "config" not in str(error.value)
    assert app.models.loaded() == before


def test_chat_history_in_the_api_is_only_what_the_call_passes(client):
    """One client session, several calls: each answer equals a fresh session's."""
    fresh = Client(client.src, verbose=False)
    for picture in easyvqa.images("test")[10:16]:
        message = {"text": "what color is the shape?", "files": [handle_file(picture.path)]}
        assert client.predict(message, "llava-easyvqa", api_name="/chat") == picture.color
    first, second = easyvqa.images("test")[20:22]
    history = [
        {
            "role": "user",
            "content": [
                {"type": "file", "file": handle_file(first.path)},
                {"type": "text", "text": "what shape is it?"},
            ],
        },
        {"role": "assistant", "content": first.shape},
    ]
    follow_up = client.predict(
        {"text": "what color is the shape?", "files": []}, "llava-easyvqa", history, api_name="/chat"
    )
    assert (
        follow_up
        == first.color
        == fresh.predict(
            {"text": "what color is the shape?", "files": [handle_file(first.path)]}, "llava-easyvqa", api_name="/chat"
        )
    )


def test_chat_errors_name_the_upload_not_the_server_path(client, tmp_path):
    text = tmp_path / "text.png"
    text.write_text("not a picture")
    with pytest.raises(Exception) as error:
        client.predict({"text": "what color?", "files": [handle_file(str(text))]}, "llava-easyvqa", api_name="/chat")
    assert "text.png" in str(error.value) and "/" not in str(error.value).split("text.png")[0][-40:]


def test_chat_caps_images_per_message_and_pixels_per_request(client, tmp_path):
    small = [handle_file(easyvqa.images("test")[i].path) for i in range(5)]
    with pytest.raises(Exception, match="at most 4"):
        client.predict({"text": "what color?", "files": small}, "llava-easyvqa", api_name="/chat")
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 8000)).save(huge)  # ~200 KB on disk, 64 megapixels decoded
    with pytest.raises(Exception, match="megapixels"):
        client.predict({"text": "what color?", "files": [handle_file(str(huge))]}, "llava-easyvqa", api_name="/chat")


def test_caption_with_only_unreadable_uploads_lists_them(client, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    table = client.predict([handle_file(str(bad))], "llava-easyvqa", "Describe the image.", api_name="/caption")
    [[name, caption]] = table["data"]
    assert name == "broken.png" and caption.startswith("(unreadable")


def test_concurrent_chats_get_the_answers_they_get_alone(client):
    pictures = easyvqa.images("test")[30:42]

    def ask(picture, model):
        return Client(client.src, verbose=False).predict(
            {"text": "what color is the shape?", "files": [handle_file(picture.path)]}, model, api_name="/chat"
        )

    for model in ("flamingo-easyvqa", "llava-easyvqa"):
        alone = [ask(p, model) for p in pictures]
        with ThreadPoolExecutor(max_workers=len(pictures)) as pool:
            together = list(pool.map(lambda p: ask(p, model), pictures))
        assert together == alone


def test_requests_from_other_origins_or_hosts_are_refused(app):
    base = app.local_url.rstrip("/")
    upload = {"files": ("a.png", b"x", "image/png")}
    assert (
        httpx.post(f"{base}/gradio_api/upload", files=upload, headers={"Origin": "http://evil.example"}).status_code
        == 403
    )
    assert httpx.get(base, headers={"Host": "evil.example"}).status_code == 403
    own_origin = base.split("//", 1)[1]
    assert (
        httpx.post(f"{base}/gradio_api/upload", files=upload, headers={"Origin": f"http://{own_origin}"}).status_code
        == 200
    )
    assert httpx.get(base).status_code == 200


def test_launch_errors_name_the_real_cause():
    from apps.web_safety import check_bind

    with pytest.raises(VlmError, match="not an address of this machine"):
        check_bind("192.0.2.1", free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(VlmError, match="in use"):
            check_bind("127.0.0.1", taken.getsockname()[1])
    from apps.gradio_app import launch

    with pytest.raises(VlmError, match="--allow-remote"):
        launch(host="0.0.0.0", port=free_port(), block=False)


def test_uploads_are_deleted_after_their_max_age(tmp_path):
    from apps.gradio_app import launch

    app = launch(port=free_port(), block=False, upload_max_age=2)
    try:
        picture = tmp_path / "p.png"
        draw_shape("red", "circle").save(picture)
        [path] = httpx.post(
            f"{app.local_url.rstrip('/')}/gradio_api/upload",
            files={"files": ("p.png", picture.read_bytes(), "image/png")},
        ).json()
        assert os.path.isfile(path)
        deadline = time.time() + 15
        while os.path.exists(path) and time.time() < deadline:
            time.sleep(0.5)
        assert not os.path.exists(path)
    finally:
        app.close()


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
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", app.local_url], capture_output=True, text=True, timeout=180
    ).stdout
    for text in ("vlmstack", "Search", "Chat", "Caption"):
        assert text in dom


def test_the_app_offers_an_exported_hugging_face_llava_given_with_model(tiny_llava, tiny_clip_dir, tmp_path):
    from apps.gradio_app import check_vqa_models
    from vlm.hf_llava import export_hf_llava

    exported = export_hf_llava(tiny_llava, tmp_path / "hf")
    assert check_vqa_models([str(exported)])[-1] == str(exported)
    with pytest.raises(VlmError, match="not a LLaVA or Flamingo model directory"):
        check_vqa_models([tiny_clip_dir])


def test_the_app_also_serves_the_openai_api_with_api(tmp_path):
    """`vlmstack app --api`: one process serves the page and /openai/v1 (openai SDK), searches
    on the same index; off loopback the API needs a key."""
    import openai

    from apps.gradio_app import launch
    from tests.test_server import data_url

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "rectangle"), ("green", "circle")]):
        draw_shape(colour, shape).save(folder / f"{i}.png")
    index = tmp_path / "index"
    build_index(folder, index, model="clip-easyvqa", progress=False)
    with pytest.raises(VlmError, match="API key"):
        launch(host="0.0.0.0", allow_remote=True, api=True, port=free_port(), index=str(index), block=False)
    app = launch(port=free_port(), index=str(index), api=True, block=False)
    try:
        sdk = openai.OpenAI(base_url=f"{app.local_url.rstrip('/')}/openai/v1", api_key="unused")
        assert {"llava-easyvqa", "flamingo-easyvqa"} <= {m.id for m in sdk.models.list()}
        reply = sdk.chat.completions.create(
            model="llava-easyvqa",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(draw_shape("red", "circle"))}},
                        {"type": "text", "text": "what color is the shape?"},
                    ],
                }
            ],
            max_tokens=4,
        )
        assert reply.choices[0].message.content == "red"
        found = httpx.post(f"{app.local_url.rstrip('/')}/openai/v1/search", json={"query": "a blue rectangle", "k": 1})
        assert found.json()["data"][0]["path"] == "1.png"
        page = Client(app.local_url, verbose=False)
        assert page.predict("a blue rectangle", None, 1, api_name="/search")[0]  # the page searches too
    finally:
        app.close()


def test_app_and_serve_load_models_in_the_precision_asked(monkeypatch):
    """`vlmstack app/serve --quantize int8 --dtype ...` reach the models they load."""
    import apps.gradio_app
    import apps.server
    from apps.gradio_app import Models
    from vlm.cli import EXIT_USAGE, main
    from vlm.quantize import Precision

    seen = {}
    monkeypatch.setattr(apps.gradio_app, "launch", lambda **kwargs: seen.setdefault("app", kwargs["precision"]))
    monkeypatch.setattr(apps.server, "serve", lambda **kwargs: seen.setdefault("serve", kwargs["precision"]))
    assert main(["app", "--quantize", "int8"]) == 0
    assert main(["serve", "--dtype", "bfloat16"]) == 0
    assert seen == {"app": Precision(quantize="int8"), "serve": Precision(dtype="bfloat16")}
    assert main(["app", "--quantize", "int8", "--dtype", "bfloat16"]) == EXIT_USAGE  # refused before serving

    picture = easyvqa.images("test")[8]
    plain = Models({"llava-easyvqa": "llava-easyvqa"}).get("llava-easyvqa")
    int8 = Models({"llava-easyvqa": "llava-easyvqa"}, precision=Precision(quantize="int8")).get("llava-easyvqa")
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.modules())
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in plain.modules())
    assert int8.answer(picture.path, "what shape is it?") == plain.answer(picture.path, "what shape is it?")
