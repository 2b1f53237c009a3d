"""`--engine ray` gives the same captions, index and embeddings as the local engine."""

import json

import numpy as np
import pytest

from apps.caption import caption_folder
from retrieval import build_index, shards, store
from tests.helpers import draw_shape

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'vlmstack[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for all the tests here (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pictures"
    root.mkdir()
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "rectangle"), ("green", "circle")] * 3):
        draw_shape(color, shape, offset=i).save(root / f"{i:02d}.png")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not a picture")
    return root


def test_ray_captions_equal_local_captions(local_ray, folder, tmp_path, tiny_llava_dir):
    common = dict(model=tiny_llava_dir, batch_size=4, max_new_tokens=6, progress=False)
    local = caption_folder(folder, out=tmp_path / "local.jsonl", **common)
    remote = caption_folder(folder, out=tmp_path / "ray.jsonl", engine="ray", workers=2, **common)
    assert (remote.captioned, len(remote.failed)) == (local.captioned, len(local.failed)) == (9, 2)
    assert sorted(remote.failed) == sorted(local.failed)
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    again = caption_folder(folder, out=tmp_path / "ray.jsonl", engine="ray", workers=2, **common)
    assert again.captioned == 0 and again.already_done == 9


def test_ray_index_equals_local_index(local_ray, folder, tmp_path, tiny_clip_dir):
    local = build_index(folder, tmp_path / "local", model=tiny_clip_dir, workers=0, progress=False)
    remote = build_index(
        folder, tmp_path / "ray", model=tiny_clip_dir, engine="ray", workers=1, batch_size=4, progress=False
    )
    assert (
        (remote.count, remote.files, len(remote.failed)) == (local.count, local.files, len(local.failed)) == (9, 9, 2)
    )
    a = store.read_data(tmp_path / "local", store.read_manifest(tmp_path / "local"))
    b = store.read_data(tmp_path / "ray", store.read_manifest(tmp_path / "ray"))
    assert a.files == b.files and a.hashes == b.hashes
    assert np.allclose(a.vectors, b.vectors, atol=1e-5)


def test_ray_embedding_shards_equal_local_ones(local_ray, folder, tmp_path, tiny_clip_dir):
    for engine in ("local", "ray"):
        shards.embed_to_shards(
            folder, tmp_path / engine, model=tiny_clip_dir, shard_size=4, engine=engine, workers=1, progress=False
        )
    for name in ("00000", "00001", "00002"):
        assert (tmp_path / "ray" / f"{name}.jsonl").read_text() == (tmp_path / "local" / f"{name}.jsonl").read_text()
        assert np.allclose(
            np.load(tmp_path / "ray" / f"{name}.npy"), np.load(tmp_path / "local" / f"{name}.npy"), atol=1e-5
        )
    rows = [json.loads(line) for line in (tmp_path / "ray" / "00002.jsonl").read_text().splitlines()]
    assert [row["path"] for row in rows if "error" in row] == ["empty.png", "notes.jpg"]
