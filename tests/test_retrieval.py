import json
import os
import shutil

import numpy as np
import pytest
import torch

from retrieval import Searcher, build_index, store, update_index
from retrieval.query import parse_query
from retrieval.spec import Refined, apply_search_params, auto_spec, build_faiss, exact_neighbours, tune_search
from tests.helpers import draw_shape
from vlm.errors import VlmError


def _paths(hits):
    return [os.path.basename(h.path) for h in hits]


def test_an_images_own_embedding_is_its_top_hit(folder, tmp_path, tiny_clip_dir):
    report = build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    assert (report.files, report.count, report.index_spec) == (4, 4, "Flat")
    searcher = Searcher.open(tmp_path / "idx")
    for path in folder.rglob("*.png"):
        [hit] = searcher.search_image(path, k=1)
        assert hit.path == str(path.resolve()) and hit.score == pytest.approx(1.0, abs=1e-4)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["model"] == tiny_clip_dir and manifest["dim"] == 128 and manifest["count"] == 4


def test_k_larger_than_the_index_returns_everything(folder, tmp_path, tiny_clip_dir):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    hits = Searcher.open(tmp_path / "idx").search_text("a red circle", k=50)
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert hits[0].score >= hits[-1].score


def test_min_score_filters(folder, tmp_path, tiny_clip_dir):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    searcher = Searcher.open(tmp_path / "idx")
    assert searcher.search_text("x", k=4, min_score=1.01) == []


def test_incremental_add_modify_delete_and_duplicates(folder, tmp_path, tiny_clip_dir, monkeypatch):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    embedded = []
    import retrieval.index as index_module

    original = index_module.embed_images
    monkeypatch.setattr(
        index_module,
        "embed_images",
        lambda clip, sources, **kw: embedded.extend(sources) or original(clip, sources, **kw),
    )

    draw_shape("blue", "circle").save(folder / "new.png")  # added
    shutil.copy(folder / "red-circle.png", folder / "copy-of-red.png")  # byte-identical duplicate
    draw_shape("green", "rectangle").save(folder / "green-circle.png")  # modified in place
    os.utime(folder / "green-circle.png", (1, 1))
    (folder / "sub" / "blue-rectangle.png").unlink()  # deleted
    report = update_index(tmp_path / "idx", workers=0, progress=False)

    assert sorted(os.path.basename(p) for p in embedded) == ["green-circle.png", "new.png"]
    assert (report.added, report.changed, report.removed, report.duplicates, report.unchanged) == (2, 1, 1, 1, 2)
    assert (report.files, report.count) == (5, 4)
    searcher = Searcher.open(tmp_path / "idx")
    assert searcher.count == 4
    [hit] = searcher.search_image(folder / "new.png", k=1)
    assert hit.path.endswith("new.png")
    assert searcher.resolve(folder / "sub" / "blue-rectangle.png") is None

    embedded.clear()
    again = update_index(tmp_path / "idx", workers=0, progress=False)
    assert embedded == [] and again.unchanged == 5


def test_a_touched_file_with_the_same_bytes_is_unchanged_and_keeps_its_new_mtime(folder, tmp_path, tiny_clip_dir):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    os.utime(folder / "red-circle.png", (1_000_000, 1_000_000))
    report = update_index(tmp_path / "idx", workers=0, progress=False)
    assert (report.added, report.changed, report.unchanged, report.removed) == (0, 0, 4, 0)
    manifest = store.read_manifest(tmp_path / "idx")
    mtimes = {path: mtime for path, mtime, _, _ in store.read_data(tmp_path / "idx", manifest).files}
    assert mtimes["red-circle.png"] == 1_000_000


def test_a_crash_during_save_leaves_the_previous_index_loadable(folder, tmp_path, tiny_clip_dir, monkeypatch):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    draw_shape("blue", "circle").save(folder / "new.png")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(store.faiss, "write_index", crash)
    with pytest.raises(OSError):
        update_index(tmp_path / "idx", workers=0, progress=False)
    monkeypatch.undo()
    searcher = Searcher.open(tmp_path / "idx")
    assert searcher.count == 4
    report = update_index(tmp_path / "idx", workers=0, progress=False)  # and a later save works
    assert report.files == 5
    assert len(list((tmp_path / "idx").glob("v*"))) == 1


def test_querying_with_another_model_names_both(folder, tmp_path, tiny_clip_dir):
    from vlm.clip import build_clip

    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    other = tmp_path / "other"
    build_clip("clip-tiny").save(other)
    with pytest.raises(VlmError) as error:
        Searcher.open(tmp_path / "idx", model=str(other))
    assert tiny_clip_dir in str(error.value) and str(other) in str(error.value)


def test_a_negative_term_moves_results_away(folder, tmp_path, tiny_clip_dir, monkeypatch):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    searcher = Searcher.open(tmp_path / "idx")
    # Pin the text encoder: "red" means the red circle's picture, "circle" the green circle's.
    pictures = {"red": folder / "red-circle.png", "circle": folder / "green-circle.png"}
    vectors = {text: searcher.clip.encode_images([path]) for text, path in pictures.items()}
    monkeypatch.setattr(searcher.clip, "encode_texts", lambda texts: torch.cat([vectors[t] for t in texts]))

    def score(query, name):
        return {os.path.basename(h.path): h.score for h in searcher.search_text(query, k=4)}[name]

    assert score("red + circle", "green-circle.png") > 0 > score("red - circle", "green-circle.png")
    assert score("red - circle", "red-circle.png") > score("red - circle", "green-circle.png")
    assert score("3:red + circle", "red-circle.png") > score("red + circle", "red-circle.png")


def test_corrupt_files_are_skipped_and_reported(folder, tmp_path, tiny_clip_dir):
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "empty.jpg").write_bytes(b"")
    report = build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    assert report.files == 4
    assert sorted(os.path.basename(reason.split(":")[0]) for reason in report.failed) == ["broken.png", "empty.jpg"]
    assert "broken.png" in report.summary()


def test_empty_folder_and_missing_index_are_clear_errors(tmp_path, tiny_clip_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmError, match="no images"):
        build_index(tmp_path / "empty", tmp_path / "idx", model=tiny_clip_dir)
    with pytest.raises(VlmError, match="not an index"):
        Searcher.open(tmp_path / "nothing")


def test_corrupt_faiss_file_is_a_clear_error(folder, tmp_path, tiny_clip_dir):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    [faiss_file] = (tmp_path / "idx").glob("v*/index.faiss")
    faiss_file.write_bytes(b"garbage")
    with pytest.raises(VlmError, match="corrupt"):
        Searcher.open(tmp_path / "idx")


def test_long_and_empty_queries(folder, tmp_path, tiny_clip_dir, caplog):
    build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    searcher = Searcher.open(tmp_path / "idx")
    assert len(searcher.search_text("red " * 2500, k=2)) == 2
    assert "truncated" in caplog.text
    with pytest.raises(VlmError, match="empty"):
        searcher.search_text("   ")


def test_query_grammar():
    assert [(t.text, t.weight) for t in parse_query("red circle - triangle")] == [
        ("red circle", 1.0),
        ("triangle", -1.0),
    ]
    assert [(t.text, t.weight) for t in parse_query("2:red + circle")] == [("red", 2.0), ("circle", 1.0)]
    assert [t.text for t in parse_query("a t-shirt")] == ["a t-shirt"]
    with pytest.raises(VlmError):
        parse_query("red + ")


@pytest.mark.parametrize("weight", ["1" * 401, "1" * 401 + ".5", "1001", "99999999"])
def test_an_absurd_query_weight_is_refused_in_one_line(weight):
    with pytest.raises(VlmError, match="weight") as error:
        parse_query(f"{weight}:red + circle")
    assert "\n" not in str(error.value) and len(str(error.value)) < 200


def test_auto_spec_grows_with_size_within_the_memory_budget():
    gib = 2**30
    assert auto_spec(1_000, 512, max_memory=12 * gib) == "Flat"
    assert auto_spec(1_000_000, 512, max_memory=12 * gib) == "IVF4096,Flat"
    assert auto_spec(1_000_000, 512, max_memory=1 * gib) == "IVF4096,SQ8"  # 2 GB of floats > 1 GiB
    assert auto_spec(10_000_000, 512, max_memory=12 * gib) == "IVF16384,SQ8"  # 5 GB of 8-bit codes
    assert auto_spec(50_000_000, 512, max_memory=12 * gib) == "OPQ64,IVF32768,PQ64"  # 25 GB of SQ8 > 12 GiB


def _clustered(rng, centers: np.ndarray, count: int) -> np.ndarray:
    """`count` unit vectors scattered widely around random cluster centres."""
    vectors = (centers[rng.integers(0, len(centers), count)] + 0.5 * rng.normal(size=(count, centers.shape[1]))).astype(
        np.float32
    )
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_tuned_ivf_search_finds_95_percent_of_the_exact_top_10_for_new_queries():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(32, 32))
    vectors, queries = _clustered(rng, centers, 10_000), _clustered(rng, centers, 200)  # queries are not indexed
    index = build_faiss(vectors, "IVF64,Flat")
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]  # brute force

    def recall_at_10(params: dict) -> float:
        apply_search_params(index, params)
        found = index.search(queries, 10)[1]
        return np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])

    # Wide clusters over 64 lists: a query's true neighbours span several lists, so
    # probing one list (an untuned index) misses about a fifth of them.
    assert recall_at_10({"nprobe": 1}) < 0.9
    assert recall_at_10(tune_search(index, vectors).params) >= 0.95


def _recall(index, queries: np.ndarray, exact: np.ndarray) -> float:
    found = index.search(queries, 10)[1]
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))


def test_refining_a_pq_index_with_the_stored_vectors_restores_recall():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(32, 64))
    vectors, queries = _clustered(rng, centers, 4_000), _clustered(rng, centers, 200)
    exact = exact_neighbours(queries, vectors, 10)
    pq = build_faiss(vectors, "IVF16,PQ8")  # 8 bytes for 64 floats: coarse codes
    refined = Refined(base=pq, vectors=vectors)

    pq_only = tune_search(pq, vectors)
    with_refine = tune_search(refined, vectors)
    # What refine buys: the widest PQ search stays far below the target; re-scoring its
    # candidates exactly reaches it, on new queries too.
    assert pq_only.params == {"nprobe": 16} and pq_only.recall < 0.7 and _recall(pq, queries, exact) < 0.7
    assert with_refine.shortfall is None and "k_factor" in with_refine.params
    assert _recall(refined, queries, exact) >= 0.95
    scores = refined.search(queries[:1], 10)[0][0]
    np.testing.assert_allclose(scores, np.sort(vectors @ queries[0])[::-1][:10], rtol=1e-5)  # exact scores


def test_the_tuner_says_in_one_line_when_it_cannot_reach_its_recall_target(caplog):
    rng = np.random.default_rng(0)
    vectors = _clustered(rng, rng.normal(size=(32, 64)), 4_000)
    with caplog.at_level("WARNING"):
        tuning = tune_search(build_faiss(vectors, "IVF16,PQ4"), vectors)
    assert tuning.shortfall is not None and "\n" not in tuning.shortfall
    assert f"recall@10 {tuning.recall:.3f} (target 0.97)" in tuning.shortfall and "nprobe=16" in tuning.shortfall
    assert tuning.shortfall in caplog.text


def test_a_lossy_index_from_shards_streams_its_vectors_and_searches_refined(tmp_path):
    from benchmarks.capacity import write_shards
    from retrieval.shards import build_index_from_shards

    write_shards(tmp_path / "emb", 6_000, 64, shard_size=2_500)
    report = build_index_from_shards(tmp_path / "emb", tmp_path / "index", spec="IVF16,SQ4", progress=False)
    manifest = store.read_manifest(tmp_path / "index")
    index = store.read_faiss(tmp_path / "index", manifest)
    assert isinstance(index, Refined) and isinstance(index.vectors, np.memmap)
    assert report.shortfall == "" and "k_factor" in manifest.search_params
    assert not (tmp_path / "index" / store.VECTORS_TMP).exists()
    vectors = store.read_vectors(tmp_path / "index", manifest)
    queries = vectors[:50] + 0.01
    apply_search_params(index, manifest.search_params)
    assert _recall(index, queries, exact_neighbours(queries, vectors, 10)) >= 0.95
