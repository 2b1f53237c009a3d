"""`vlmstack serve`: the OpenAI-compatible API, called as users call it (the openai SDK, raw HTTP).

One server (the shipped llava-easyvqa and clip-easyvqa, an index of three drawn shapes, an
API key) runs on a free port in a thread for the whole module.
"""

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from tests.helpers import draw_good_images, draw_shape
from vlm.quantize import Precision

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key-123"
QUESTION = "what color is the shape?"


def data_url(image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return draw_good_images(tmp_path_factory.mktemp("server") / "images")


@pytest.fixture(scope="module")
def server(images):
    """The base URL of a running server; shut down (gracefully) after the module."""
    from apps.server import build_api
    from retrieval import build_index

    index = images.parent / "index"
    build_index(images, index, progress=False)
    base, server, thread = start(build_api(index=str(index), api_key=KEY, max_batch=8))
    yield base
    server.should_exit = True
    thread.join(60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server: str, path: str, *, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server}{path}", headers={**headers, **kwargs.pop("headers", {})}, timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_models_list_offers_the_shipped_vqa_models_and_the_clip(client):
    models = {m.id: m.model_extra["kind"] for m in client.models.list()}
    assert models == {"llava-easyvqa": "llava", "flamingo-easyvqa": "flamingo", "clip-easyvqa": "clip"}


def test_chat_answers_a_base64_image(client):
    reply = client.chat.completions.create(
        model="llava-easyvqa", messages=image_message(data_url(draw_shape("red", "circle"))), max_tokens=8
    )
    assert reply.choices[0].message.content == "red"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens >= 1


def test_chat_streams_role_content_finish_reason_and_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="llava-easyvqa",
            messages=image_message(data_url(draw_shape("blue", "rectangle"), "JPEG")),
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "blue"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_concurrent_chats_get_the_answers_they_get_alone(client):
    shapes = [("red", "circle"), ("green", "circle"), ("blue", "rectangle"), ("red", "circle")]
    answers = [None] * len(shapes)

    def ask(i, color, shape):
        reply = client.chat.completions.create(
            model="llava-easyvqa", messages=image_message(data_url(draw_shape(color, shape))), max_tokens=8
        )
        answers[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, *s)) for i, s in enumerate(shapes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [color for color, _ in shapes]


def test_embeddings_equal_the_clis_and_have_the_models_dimension(client, images, tmp_path):
    from vlm.cli import main
    from vlm.clip import load_clip

    assert main(["embed", str(images), "--out", str(tmp_path / "emb"), "--workers", "0"]) == 0
    rows = [json.loads(line)["path"] for line in (tmp_path / "emb" / "00000.jsonl").read_text().splitlines()]
    cli_vectors = np.load(tmp_path / "emb" / "00000.npy")
    name = rows[0]
    picture = data_url_of_file(images / name)
    result = client.embeddings.create(model="clip-easyvqa", input=["a red circle", {"image": picture}])
    text_vector, image_vector = (np.asarray(d.embedding, np.float32) for d in result.data)
    clip = load_clip("clip-easyvqa")
    assert text_vector.shape == image_vector.shape == (clip.embed_dim,)
    np.testing.assert_allclose(image_vector, cli_vectors[0], atol=1e-5)
    np.testing.assert_allclose(text_vector, clip.encode_texts(["a red circle"])[0].numpy(), atol=1e-5)
    floats = client.embeddings.create(model="clip-easyvqa", input="a red circle", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, text_vector, atol=1e-6)


def data_url_of_file(path) -> str:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_search_finds_indexed_images_and_serves_only_their_thumbnails(server, images):
    found = post(server, "/v1/search", json={"query": "a red circle", "k": 3})
    assert found.status_code == 200, found.text
    hits = found.json()["data"]
    assert len(hits) == 3 and {"path", "score", "thumbnail_url"} <= set(hits[0])
    thumbnail = httpx.get(hits[0]["thumbnail_url"], headers={"Authorization": f"Bearer {KEY}"})
    assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"  # a JPEG
    by_image = post(server, "/v1/search", json={"image": data_url_of_file(images / "green-circle.png"), "k": 1})
    assert by_image.json()["data"][0]["path"] == "green-circle.png"  # relative to the indexed folder
    for outside in ("/etc/passwd", "../index/manifest.json", str(images / "red-circle.png") + "/.."):
        found = httpx.get(
            f"{server}/v1/thumbnails", params={"path": outside}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert_openai_error(found, 404)


RED = data_url(draw_shape("red", "circle"))
CHAT = {"model": "llava-easyvqa", "max_tokens": 4}


@pytest.mark.parametrize(
    "body, status, param",
    [
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages.0.content.0.image_url.url",
        ),
        ({**CHAT, "messages": image_message("data:image/png;base64,not base64!")}, 400, "messages"),
        ({**CHAT, "messages": image_message("data:image/png,rawdata")}, 400, "messages"),
        (
            {**CHAT, "messages": image_message("data:image/png;base64," + base64.b64encode(b"GIF89a...").decode())},
            400,
            "messages",
        ),
        ({**CHAT, "messages": image_message("file:///etc/passwd")}, 400, "messages"),
        ({**CHAT, "messages": image_message("http://example.com/a.png")}, 400, "messages"),
        (
            {
                **CHAT,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED}}] * 17}],
            },
            400,
            "messages",
        ),
        ({**CHAT, "messages": [{"role": "user", "content": "what is <image>?"}]}, 400, "messages.0"),
        ({**CHAT, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
        ({**CHAT, "n": 2, "messages": image_message(RED)}, 400, "n"),
        ({**CHAT, "max_tokens": 10**6, "messages": image_message(RED)}, 400, "max_tokens"),
        ({**CHAT, "model": "/etc/passwd", "messages": image_message(RED)}, 404, "model"),
        ({"model": "llava-easyvqa"}, 400, "messages"),
    ],
    ids=[
        "missing-image-url",
        "bad-base64",
        "not-base64-data-url",
        "not-an-image",
        "file-url",
        "remote-url-off",
        "too-many-images",
        "literal-image-marker",
        "ends-with-assistant",
        "n-2",
        "max-tokens",
        "unknown-model",
        "no-messages",
    ],
)
def test_bad_chat_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    error = assert_openai_error(post(server, "/v1/chat/completions", json=body), status)
    assert error["param"] == param
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_a_picture_with_too_many_pixels_is_refused_before_decoding(server):
    from PIL import Image

    huge = Image.new("1", (8000, 5000))  # 40 Mpx, a few kB as PNG
    error = assert_openai_error(
        post(server, "/v1/chat/completions", json={**CHAT, "messages": image_message(data_url(huge))}), 400
    )
    assert "megapixels" in error["message"]


def test_bad_json_and_oversized_bodies_are_refused(server):
    error = assert_openai_error(
        post(server, "/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}), 400
    )
    assert error["code"] == "invalid_json"
    big = b"x" * (17 * 1024 * 1024)
    assert_openai_error(post(server, "/v1/embeddings", content=big), 413)

    def chunked():  # no Content-Length: the streamed body is counted
        for _ in range(17):
            yield b"x" * (1024 * 1024)

    assert_openai_error(post(server, "/v1/embeddings", content=chunked()), 413)
    assert_openai_error(httpx.get(f"{server}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert httpx.get(f"{server}/health").status_code == 200


def test_every_v1_route_needs_the_key(server):
    for key in (None, "wrong-key"):
        error = assert_openai_error(
            post(server, "/v1/embeddings", key=key, json={"model": "clip-easyvqa", "input": "a"}), 401
        )
        assert error["code"] == "invalid_api_key"
        assert_openai_error(httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {key}"}), 401)
    assert httpx.get(f"{server}/health").status_code == 200  # liveness needs no key


def test_foreign_hosts_and_origins_are_refused(server):
    rebound = httpx.get(f"{server}/health", headers={"Host": "evil.example:80"})
    assert_openai_error(rebound, 403)
    cross = post(
        server,
        "/v1/embeddings",
        json={"model": "clip-easyvqa", "input": "a"},
        headers={"Origin": "http://evil.example"},
    )
    assert_openai_error(cross, 403)


def test_bad_embedding_requests_get_openai_errors(server):
    for body, status in [
        ({"model": "clip-easyvqa", "input": []}, 400),
        ({"model": "clip-easyvqa", "input": [[1, 2, 3]]}, 400),
        ({"model": "clip-easyvqa", "input": [{"image": "data:image/png;base64,AAAA"}]}, 400),
        ({"model": "llava-easyvqa", "input": "a"}, 404),
    ]:
        assert_openai_error(post(server, "/v1/embeddings", json=body), status)


def test_a_client_leaving_mid_stream_cancels_its_generation(server):
    from apps.server_chat import Reply

    cancelled = threading.Event()
    original = Reply.pieces

    async def watched(self):
        cancel = self.stream.cancel
        self.stream.cancel = lambda: (cancelled.set(), cancel())
        async for piece in original(self):
            yield piece

    Reply.pieces = watched
    try:
        body = {**CHAT, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "count " * 40}]}
        with httpx.stream(
            "POST", f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the role delta; then hang up
        assert cancelled.wait(10)
    finally:
        Reply.pieces = original


def test_serve_refuses_a_non_loopback_host_without_a_key(capsys, monkeypatch):
    from vlm.cli import main

    monkeypatch.delenv("VLMSTACK_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "8123"]) == 2
    assert "--api-key" in capsys.readouterr().err


def start(api) -> tuple[str, "uvicorn.Server", threading.Thread]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def test_shutdown_finishes_a_running_request_then_closes_the_schedulers():
    from apps.server import build_api

    api = build_api()  # no key on loopback; flamingo-easyvqa loads on the first request
    base, server, thread = start(api)
    replies = []
    body = {"model": "flamingo-easyvqa", "max_tokens": 8, "messages": image_message(RED)}
    asking = threading.Thread(
        target=lambda: replies.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60))
    )
    asking.start()
    time.sleep(0.3)  # the request is in flight (the model is loading)
    server.should_exit = True
    asking.join(60)
    thread.join(60)
    assert replies[0].status_code == 200 and replies[0].json()["choices"][0]["message"]["content"] == "red"
    assert api.state.engines.loaded() == []  # closed by the lifespan


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/a.png", "http://10.1.2.3/a.png", "http://[::1]/a.png", "http://localhost/a.png"]
)
def test_remote_images_are_never_fetched_from_local_or_private_addresses(url):
    from apps.server_errors import ApiError
    from apps.server_inputs import ImagePolicy

    with pytest.raises(ApiError, match="private or local"):
        ImagePolicy(allow_remote=True).load([url])


def test_at_most_two_models_stay_loaded_and_the_evicted_one_is_closed():
    from apps.server import Engine, Engines
    from apps.server_errors import ApiError

    closed = []

    class Scheduler:
        def __init__(self, name):
            self.name = name

        def close(self, timeout=None):
            closed.append(self.name)

    class Counted(Engines):
        def _load(self, name):
            return Engine(model=None, scheduler=Scheduler(name))

    engines = Counted(
        {"a": "a", "b": "b", "c": "c"}, capacity=2, max_batch=4, trust_remote_code=False, precision=Precision()
    )
    for name in ("a", "b", "a", "c"):
        engines.get(name)
    assert engines.loaded() == ["a", "c"]
    deadline = time.monotonic() + 5
    while closed != ["b"] and time.monotonic() < deadline:  # closed in the background
        time.sleep(0.01)
    assert closed == ["b"]
    with pytest.raises(ApiError, match="unknown model") as refused:
        engines.get("../../etc")
    assert refused.value.status == 404
    engines.close()
    assert sorted(closed) == ["a", "b", "c"] and engines.loaded() == []
