"""The milvus backend against Milvus Lite (the milvus-lite package: the engine runs
embedded, nothing is mocked)."""

import json
import time

import numpy as np
import pytest

from retrieval import Searcher, build_index, store, update_index
from retrieval import milvus as milvus_backend
from retrieval.shards import build_index_from_shards
from tests.helpers import draw_shape
from vlm.errors import VlmError

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pictures"
    root.mkdir()
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "rectangle"), ("green", "circle")]):
        draw_shape(color, shape, offset=i).save(root / f"{color}-{shape}.png")
    return root


def _collections(uri: str, index_dir) -> list[str]:
    prefix = milvus_backend.collection_prefix(index_dir)
    return [name for name in milvus_backend.connect(uri).list_collections() if name.startswith(prefix)]


def test_milvus_and_faiss_return_the_same_top_10_on_the_easyvqa_test_index(tmp_path):
    from retrieval.shards import embed_to_shards
    from vlm.data import easyvqa

    embed_to_shards(easyvqa.image_dir("test"), tmp_path / "emb", workers=0, progress=False)  # 1,000 images
    uri = str(tmp_path / "milvus.db")
    build_index_from_shards(tmp_path / "emb", tmp_path / "faiss.index", progress=False)
    report = build_index_from_shards(
        tmp_path / "emb", tmp_path / "milvus.index", backend="milvus", milvus_uri=uri, progress=False
    )
    assert report.index_spec == "milvus FLAT" and report.count == 1_000
    with_faiss, with_milvus = Searcher.open(tmp_path / "faiss.index"), Searcher.open(tmp_path / "milvus.index")
    colors = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
    for query in [f"a {c} {s}" for c in colors for s in ("circle", "rectangle", "triangle")]:
        expected, hits = with_faiss.search_text(query, k=10), with_milvus.search_text(query, k=10)
        assert [(h.rank, h.path) for h in hits] == [(h.rank, h.path) for h in expected], query
        assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)


def test_update_and_delete_round_trip_through_milvus_with_the_faiss_hit_shape(folder, tmp_path, tiny_clip_dir):
    uri, index = str(tmp_path / "milvus.db"), tmp_path / "idx"
    report = build_index(
        folder, index, model=tiny_clip_dir, backend="milvus", milvus_uri=uri, workers=0, progress=False
    )
    assert (report.files, report.index_spec) == (3, "milvus FLAT")
    faiss_hits = build_index(
        folder, tmp_path / "faiss", model=tiny_clip_dir, workers=0, progress=False
    ) and Searcher.open(tmp_path / "faiss").search_text("a red circle", k=3)
    hits = Searcher.open(index).search_text("a red circle", k=3)
    assert [(h.rank, h.path) for h in hits] == [(h.rank, h.path) for h in faiss_hits]
    assert [h.score for h in hits] == pytest.approx([h.score for h in faiss_hits], abs=1e-5)

    (folder / "green-circle.png").unlink()
    draw_shape("red", "rectangle", offset=5).save(folder / "new.png")
    first = _collections(uri, index)
    report = update_index(index, workers=0, progress=False)
    assert (report.added, report.removed, report.unchanged, report.files) == (1, 1, 2, 3)
    searcher = Searcher.open(index)
    paths = {h.path for h in searcher.search_text("anything", k=10)}
    assert paths == {str(p.resolve()) for p in folder.glob("*.png")}
    [hit] = searcher.search_image(folder / "new.png", k=1)
    assert hit.path == str((folder / "new.png").resolve()) and hit.score == pytest.approx(1.0, abs=1e-4)
    assert len(_collections(uri, index)) == 1 and _collections(uri, index) != first  # the old version dropped


def test_a_collection_embedded_with_other_weights_is_refused(folder, tmp_path, tiny_clip_dir):
    uri = str(tmp_path / "milvus.db")
    build_index(
        folder, tmp_path / "a", model=tiny_clip_dir, backend="milvus", milvus_uri=uri, workers=0, progress=False
    )
    manifest = store.read_manifest(tmp_path / "a")
    client = milvus_backend.connect(uri)
    client.drop_collection(manifest.collection)
    other = milvus_backend.write_collection(
        uri,
        manifest.collection.rsplit("_", 1)[0],
        np.eye(3, manifest.dim, dtype=np.float32),
        model="m",
        fingerprint="f",
    )
    data = json.loads((tmp_path / "a" / "manifest.json").read_text())
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({**data, "collection": other.collection}))
    with pytest.raises(VlmError, match=r"embedded with m \(weights f\), the index says weights") as e:
        Searcher.open(tmp_path / "a")
    assert "\n" not in str(e.value)


def test_an_unreachable_milvus_uri_fails_in_one_line_before_any_work(folder, tmp_path, tiny_clip_dir):
    started = time.perf_counter()
    with pytest.raises(VlmError, match="cannot reach Milvus at http://127.0.0.1:9") as e:
        build_index(folder, tmp_path / "idx", model=tiny_clip_dir, backend="milvus", milvus_uri="http://127.0.0.1:9")
    assert "\n" not in str(e.value) and time.perf_counter() - started < 15
    assert not (tmp_path / "idx").exists()

    uri = str(tmp_path / "milvus.db")
    build_index(
        folder, tmp_path / "b", model=tiny_clip_dir, backend="milvus", milvus_uri=uri, workers=0, progress=False
    )
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({**data, "milvus_uri": "http://127.0.0.1:9"}))
    for action in (
        lambda: update_index(tmp_path / "b", workers=0, progress=False),
        lambda: Searcher.open(tmp_path / "b"),
    ):
        with pytest.raises(VlmError, match="cannot reach Milvus at http://127.0.0.1:9") as e:
            action()
        assert "\n" not in str(e.value)


def test_an_interrupted_milvus_build_or_update_is_never_searched_as_complete(
    folder, tmp_path, tiny_clip_dir, monkeypatch
):
    uri, index = str(tmp_path / "milvus.db"), tmp_path / "idx"
    write = milvus_backend.write_collection

    def interrupted(*args, **kwargs):
        client = milvus_backend.connect(uri)
        original = type(client).insert
        monkeypatch.setattr(type(client), "insert", lambda self, *a, **k: (original(self, *a, **k), 1 / 0))
        try:
            return write(*args, chunk=1, **kwargs)  # dies after the first row is in
        finally:
            monkeypatch.setattr(type(client), "insert", original)

    monkeypatch.setattr(milvus_backend, "write_collection", interrupted)
    with pytest.raises(ZeroDivisionError):
        build_index(folder, index, model=tiny_clip_dir, backend="milvus", milvus_uri=uri, workers=0, progress=False)
    assert len(_collections(uri, index)) == 1  # the half-loaded collection is there ...
    with pytest.raises(VlmError, match="not an index"):
        Searcher.open(index)  # ... but nothing names it

    monkeypatch.setattr(milvus_backend, "write_collection", write)
    build_index(folder, index, model=tiny_clip_dir, backend="milvus", milvus_uri=uri, workers=0, progress=False)
    assert len(_collections(uri, index)) == 1  # the leftover was dropped by the save

    draw_shape("blue", "circle", offset=2).save(folder / "new.png")
    monkeypatch.setattr(milvus_backend, "write_collection", interrupted)
    with pytest.raises(ZeroDivisionError):
        update_index(index, workers=0, progress=False)
    searcher = Searcher.open(index)  # the previous version, whole
    assert searcher.count == 3 and len(searcher.search_text("a circle", k=10)) == 3
