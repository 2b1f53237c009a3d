"""Webdataset input and sharded, resumable embeddings (`vlmstack embed` -> `index build`)."""

import io
import json

import numpy as np
import pytest

from apps.caption import caption_folder
from apps.gradio_app import served_pictures
from retrieval import Searcher, build_index, shards
from retrieval import index as index_module
from tests.helpers import draw_shape
from vlm.data import sources, webdataset
from vlm.errors import VlmError
from vlm.images import load_image

SAMPLES = [("red", "circle"), ("blue", "rectangle"), ("green", "rectangle"), ("red", "rectangle"), ("blue", "circle")]


def _png(color, shape, offset=0) -> bytes:
    buffer = io.BytesIO()
    draw_shape(color, shape, offset=offset).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tar_shards(tmp_path):
    items = [(_png(c, s, i), "png", f"a {c} {s}") for i, (c, s) in enumerate(SAMPLES)]
    items.append((b"not an image at all", "jpg", "a broken sample"))
    webdataset.write_shards(items, tmp_path / "shards", per_shard=2)
    return tmp_path / "shards"


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pictures"
    root.mkdir()
    for i in range(7):
        color, shape = SAMPLES[i % len(SAMPLES)]
        draw_shape(color, shape, offset=i).save(root / f"{i:02d}.png")
    (root / "copy.png").write_bytes((root / "00.png").read_bytes())  # byte-identical duplicate
    (root / "broken.png").write_bytes(b"")
    return root


def test_webdataset_round_trip(tar_shards):
    assert [p.name for p in webdataset.shard_paths(tar_shards)] == ["00000.tar", "00001.tar", "00002.tar"]
    braces = webdataset.shard_paths(f"{tar_shards}/{{00000..00002}}.tar")
    assert braces == webdataset.shard_paths(tar_shards)
    records = sources.caption_records(str(tar_shards))
    assert [r.caption for r in records] == [f"a {c} {s}" for c, s in SAMPLES] + ["a broken sample"]
    for record, (color, shape) in zip(records, SAMPLES):
        expected = np.asarray(load_image(_png(color, shape, SAMPLES.index((color, shape)))))
        assert np.array_equal(np.asarray(load_image(record.image)), expected)
    assert str(records[0].image).endswith("00000.tar#00000000.png")
    with pytest.raises(VlmError, match="missing webdataset shards"):
        webdataset.shard_paths(f"{tar_shards}/{{00000..00009}}.tar")


def test_captioning_webdataset_shards_resumes(tiny_llava, tar_shards, tmp_path):
    out = tmp_path / "captions.jsonl"
    report = caption_folder(tar_shards, model=tiny_llava, out=out, max_new_tokens=4, progress=False)
    assert report.captioned == 5 and len(report.failed) == 1 and "00002.tar#00000005.jpg" in report.failed[0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["image"] == "shards/00000.tar#00000000.png"
    as_data = sources.caption_records(str(out))  # the output is a caption dataset again
    assert np.array_equal(np.asarray(load_image(as_data[0].image)), np.asarray(load_image(_png("red", "circle", 0))))
    again = caption_folder(tar_shards, model=tiny_llava, out=out, max_new_tokens=4, progress=False)
    assert again.captioned == 0 and again.already_done == 5
    with pytest.raises(VlmError, match="webdataset"):
        caption_folder(tar_shards, model=tiny_llava, out=None, fmt="txt", progress=False)


def test_index_from_shards_equals_the_direct_index(folder, tmp_path, tiny_clip_dir):
    report = shards.embed_to_shards(
        folder, tmp_path / "emb", model=tiny_clip_dir, shard_size=3, workers=0, progress=False
    )
    assert (report.embedded, report.shards, len(report.failed)) == (8, 3, 1)
    assert sorted(p.name for p in (tmp_path / "emb").glob("*.npy")) == ["00000.npy", "00001.npy", "00002.npy"]
    from_shards = shards.build_index_from_shards(tmp_path / "emb", tmp_path / "a", progress=False)
    direct = build_index(folder, tmp_path / "b", model=tiny_clip_dir, workers=0, progress=False)
    assert (
        (from_shards.files, from_shards.count, from_shards.duplicates)
        == (direct.files, direct.count, direct.duplicates)
        == (8, 7, 1)
    )
    a, b = Searcher.open(tmp_path / "a"), Searcher.open(tmp_path / "b")
    for query in ("a red circle", "a blue rectangle"):
        hits_a, hits_b = a.search_text(query, k=8), b.search_text(query, k=8)
        assert [h.path for h in hits_a] == [h.path for h in hits_b]
        assert np.allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-5)


def test_a_crash_mid_embedding_loses_at_most_one_shard(folder, tmp_path, tiny_clip_dir, monkeypatch):
    real, calls = shards.embed_images, []

    def embed_or_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed during the third shard")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "embed_images", embed_or_crash)
    with pytest.raises(KeyboardInterrupt):
        shards.embed_to_shards(folder, tmp_path / "emb", model=tiny_clip_dir, shard_size=3, workers=0, progress=False)
    assert sorted(p.name for p in (tmp_path / "emb").iterdir() if not p.name.startswith(".")) == [
        "00000.jsonl",
        "00000.npy",
        "00001.jsonl",
        "00001.npy",
        "embeddings.json",
    ]
    with pytest.raises(VlmError, match="1 of 3 shards unfinished"):
        shards.build_index_from_shards(tmp_path / "emb", tmp_path / "idx", progress=False)
    monkeypatch.setattr(shards, "embed_images", real)
    report = shards.embed_to_shards(
        folder, tmp_path / "emb", model=tiny_clip_dir, shard_size=3, workers=0, progress=False
    )
    assert (report.resumed_shards, report.embedded) == (2, 2)
    assert shards.build_index_from_shards(tmp_path / "emb", tmp_path / "idx", progress=False).files == 8


def test_resuming_with_other_settings_is_refused(folder, tmp_path, tiny_clip_dir):
    shards.embed_to_shards(folder, tmp_path / "emb", model=tiny_clip_dir, shard_size=3, workers=0, progress=False)
    with pytest.raises(VlmError, match="different shard_size"):
        shards.embed_to_shards(folder, tmp_path / "emb", model=tiny_clip_dir, shard_size=4, workers=0, progress=False)


def test_webdataset_embeddings_make_a_searchable_but_not_updatable_index(tar_shards, tmp_path, tiny_clip_dir):
    shards.embed_to_shards(tar_shards, tmp_path / "emb", model=tiny_clip_dir, workers=0, progress=False)
    report = shards.build_index_from_shards(tmp_path / "emb", tmp_path / "idx", progress=False)
    assert report.count == 5 and len(report.failed) == 1
    hits = Searcher.open(tmp_path / "idx").search_text("a red circle", k=5)
    assert all(".tar#" in hit.path for hit in hits)
    assert len(served_pictures(Searcher.open(tmp_path / "idx"), hits)[0]) == 5
    with pytest.raises(VlmError, match="webdataset shards"):
        index_module.update_index(tmp_path / "idx", progress=False)


def test_cli_embed_then_index_build_then_search(folder, tmp_path, tiny_clip_dir, capsys):
    from vlm.cli import main

    assert (
        main(
            [
                "embed",
                str(folder),
                "--out",
                str(tmp_path / "emb"),
                "--model",
                tiny_clip_dir,
                "--shard-size",
                "4",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert "8 embedded into 3 shards (0 done before), 1 unreadable" in capsys.readouterr().out
    assert main(["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0
    assert "8 files (7 distinct images)" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "idx"), "a red circle", "-k", "3", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["path"].startswith(str(folder)) for h in hits)
