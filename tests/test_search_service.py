"""SearchService: Searcher's results and the CLI's embeddings through one shared, batched
CLIP, and thumbnails only of files the index holds."""

import io
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from apps.search_service import MicroBatcher, SearchService
from retrieval import Searcher, build_index
from tests.helpers import draw_shape
from vlm.errors import VlmError

QUERIES = ["a red circle", "a blue rectangle", "green", "red circle - triangle", "2:red + circle"]


@pytest.fixture
def index(folder, tmp_path, tiny_clip_dir):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    return tmp_path / "idx"


@pytest.fixture
def service(index):
    service = SearchService(index=index)
    yield service
    service.close()


def _pictures(folder):
    return [Image.open(path).convert("RGB") for path in sorted(folder.rglob("*.png"))]


def test_text_and_image_search_equal_the_searchers(service, index, folder, tiny_clip_dir):
    searcher = Searcher.open(index)
    assert (service.clip_name, service.dim) == (tiny_clip_dir, 128)
    for query in QUERIES:
        ours, theirs = service.search_text(query, 3), searcher.search_text(query, k=3)
        assert [(h.rank, h.path) for h in ours] == [(h.rank, h.path) for h in theirs]
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], abs=1e-6)
    for picture in _pictures(folder):
        ours, theirs = service.search_image(picture, 4), searcher.search_image(picture, k=4)
        assert [h.path for h in ours] == [h.path for h in theirs]
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], abs=1e-6)


def test_embeddings_equal_the_cli_embed_output_and_the_searchers_text_vectors(service, index, folder, tmp_path):
    from vlm.cli import main

    out = tmp_path / "emb"
    assert main(["embed", str(folder), "--out", str(out), "--model", service.clip_name, "--workers", "0"]) == 0
    rows = [json.loads(line) for line in (out / "00000.jsonl").read_text().splitlines()]
    cli_vectors = np.load(out / "00000.npy")
    ours = service.embed_images([Image.open(os.path.join(folder, r["path"])).convert("RGB") for r in rows])
    assert ours.dtype == np.float32 and ours.shape == cli_vectors.shape == (4, service.dim)
    np.testing.assert_allclose(ours, cli_vectors, atol=1e-6)
    texts = ["a red circle", "a blue rectangle"]
    searcher = Searcher.open(index)
    np.testing.assert_allclose(service.embed_texts(texts), [searcher.text_vector(t) for t in texts], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(service.embed_texts(texts), axis=1), 1.0, atol=1e-5)
    assert service.embed_texts([]).shape == (0, service.dim)


def test_micro_batcher_runs_two_threads_requests_in_one_call():
    calls = []

    def double(items):
        calls.append(list(items))
        return [2 * x for x in items]

    batcher = MicroBatcher(double, max_batch=3, max_wait_ms=1000)
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.update({n: batcher.submit([n, n + 10])})) for n in (1, 2)]
    threads[0].start()
    threads[1].start()
    for t in threads:
        t.join()
    batcher.close()
    assert results == {1: [2, 22], 2: [4, 24]}
    assert sorted(len(c) for c in calls) == [2, 2]  # 2 + 2 > max_batch: the second waits its turn
    calls.clear()
    batcher = MicroBatcher(double, max_batch=4, max_wait_ms=3000)
    threads = [threading.Thread(target=lambda n=n: results.update({n: batcher.submit([n, n + 10])})) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert results == {1: [2, 22], 2: [4, 24]} and len(calls) == 1 and sorted(calls[0]) == [1, 2, 11, 12]


def test_a_failing_input_fails_only_its_own_caller():
    def positive(items):
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return items

    batcher = MicroBatcher(positive, max_batch=8, max_wait_ms=500)
    outcome = {}

    def call(n):
        try:
            outcome[n] = batcher.submit([n])
        except ValueError as e:
            outcome[n] = str(e)

    threads = [threading.Thread(target=call, args=(n,)) for n in (1, -1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert outcome == {1: [1], -1: "negative", 2: [2]}


def test_concurrent_encodings_are_one_forward_and_equal_unbatched(index, folder):
    service = SearchService(index=index, max_batch=64, max_wait_ms=1500)
    pictures = _pictures(folder)
    alone_texts = [service._clip.encode_texts([q]).numpy() for q in QUERIES]
    alone_images = [service._clip.encode_images([p]).numpy() for p in pictures]
    forwards = []
    real_texts, real_images = service._clip.encode_texts, service._clip.encode_images
    service._clip.encode_texts = lambda texts: forwards.append(("text", len(texts))) or real_texts(texts)
    service._clip.encode_images = lambda images: forwards.append(("image", len(images))) or real_images(images)
    texts, images, barrier = {}, {}, threading.Barrier(len(QUERIES) + len(pictures))

    def text(i):
        barrier.wait()
        texts[i] = service.embed_texts([QUERIES[i]])

    def image(i):
        barrier.wait()
        images[i] = service.embed_images([pictures[i]])

    threads = [threading.Thread(target=text, args=(i,)) for i in range(len(QUERIES))]
    threads += [threading.Thread(target=image, args=(i,)) for i in range(len(pictures))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.close()
    assert sorted(forwards) == [("image", len(pictures)), ("text", len(QUERIES))]
    for i in range(len(QUERIES)):
        np.testing.assert_allclose(texts[i], alone_texts[i], atol=1e-6)
    for i in range(len(pictures)):
        np.testing.assert_allclose(images[i], alone_images[i], atol=1e-6)


def test_thumbnail_is_a_small_jpeg_made_once(service, folder, monkeypatch):
    import retrieval.thumbnails as thumbnails

    path = str(next(folder.rglob("*.png")).resolve())
    data = service.thumbnail(path)
    assert data[:2] == b"\xff\xd8"  # JPEG
    with Image.open(io.BytesIO(data)) as picture:
        assert max(picture.size) <= 256
    monkeypatch.setattr(thumbnails, "load_image", lambda *a, **k: pytest.fail("reopened a cached thumbnail"))
    assert service.thumbnail(path) == data


def test_thumbnail_refuses_every_path_the_index_does_not_hold(tmp_path, tiny_clip_dir, monkeypatch):
    import retrieval.thumbnails as thumbnails

    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    draw_shape("red", "circle").save(folder / "red.png")
    draw_shape("blue", "circle").save(folder / "sub" / "blue.png")
    draw_shape("green", "triangle").save(tmp_path / "private.png")
    (folder / "link.png").symlink_to(tmp_path / "private.png")
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    draw_shape("green", "circle").save(folder / "added-later.png")  # in the folder, not in the index
    service = SearchService(index=tmp_path / "idx")
    opened = []
    real = thumbnails.load_image
    monkeypatch.setattr(thumbnails, "load_image", lambda source, **k: opened.append(str(source)) or real(source, **k))
    refused = [
        tmp_path / "private.png",
        folder / "link.png",  # a symlink pointing out of the folder, though the index lists its name
        folder / "sub" / ".." / ".." / "private.png",
        folder / "added-later.png",
        "/etc/passwd",
        "red.png",  # relative: resolved against the working directory, not the folder
        folder,
    ]
    for path in refused:
        with pytest.raises(KeyError):
            service.thumbnail(str(path))
    assert opened == []
    assert service.thumbnail(str(folder / "sub" / ".." / "red.png"))[:2] == b"\xff\xd8"
    assert opened == [str(folder.resolve() / "red.png")]
    service.close()


def test_an_unreadable_indexed_file_is_a_vlm_error(service, folder):
    path = next(folder.rglob("*.png"))
    path.write_bytes(b"not a picture any more")
    with pytest.raises(VlmError):
        service.thumbnail(str(path))


def test_without_an_index_it_embeds_but_refuses_to_search(tiny_clip_dir):
    service = SearchService(clip=tiny_clip_dir)
    assert service.embed_texts(["a red circle"]).shape == (1, 128)
    with pytest.raises(VlmError, match="no index"):
        service.search_text("a red circle", 3)
    with pytest.raises(VlmError, match="no index"):
        service.thumbnail("/etc/passwd")
    service.close()


def test_a_bad_index_or_model_is_a_vlm_error(tmp_path, index):
    with pytest.raises(VlmError):
        SearchService(index=tmp_path / "nowhere")
    with pytest.raises(VlmError):
        SearchService(clip="no-such-clip")
    with pytest.raises(VlmError, match="built with"):
        SearchService(index=index, clip="clip-easyvqa")
