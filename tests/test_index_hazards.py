"""What `index build`, `index update` and `embed` do with a hostile folder or a damaged
index: every bad entry is named and skipped, no folder the index did not write is ever
deleted, two writers never run at once, and a damaged index is one line, not a traceback."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrieval import Searcher, build_index, shards, store, update_index
from tests.helpers import (
    GOOD_IMAGES,
    HAZARDS,
    draw_good_images,
    draw_shape,
    fail_if_blocked,
    make_hazard_folder,
    one_error_line,
)
from vlm.cli import main
from vlm.errors import VlmError


@pytest.fixture(autouse=True)
def never_hang():
    """Fail a test that blocks (on a FIFO, on a lock) instead of hanging the suite."""
    with fail_if_blocked(60):
        yield


@pytest.fixture
def hazards(tmp_path) -> Path:
    return make_hazard_folder(tmp_path / "pictures")


def _names_every_hazard(text: str) -> bool:
    return all(name in text for name in HAZARDS)


def _indexed_names(index: Path) -> list[str]:
    manifest = store.read_manifest(index)
    return sorted(Path(path).name for path, *_ in store.read_data(index, manifest).files)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- folder hazards: FIFO, dangling link, link loop, latin-1 name (#6, #7, #8) ----


def test_index_build_and_update_name_and_skip_every_hazard(hazards, tmp_path, tiny_clip_dir, capsys):
    code, out, err = _run(
        capsys, "index", "build", hazards, "--out", tmp_path / "idx", "--model", tiny_clip_dir, "--workers", 0
    )
    assert code == 0, err
    assert _names_every_hazard(out) and out.count("unreadable: ") == len(HAZARDS)
    assert _indexed_names(tmp_path / "idx") == GOOD_IMAGES

    code, out, err = _run(capsys, "index", "update", tmp_path / "idx", "--workers", 0)
    assert code == 0, err
    assert _names_every_hazard(out) and "3 unchanged" in out
    assert _indexed_names(tmp_path / "idx") == GOOD_IMAGES


def test_embed_names_and_skips_every_hazard(hazards, tmp_path, tiny_clip_dir, capsys):
    code, out, err = _run(capsys, "embed", hazards, "--out", tmp_path / "emb", "--model", tiny_clip_dir, "--workers", 0)
    assert code == 0, err
    assert "3 embedded" in out and _names_every_hazard(out)
    report = shards.build_index_from_shards(tmp_path / "emb", tmp_path / "idx", progress=False)
    assert report.files == 3


@contextlib.contextmanager
def _sabotaged_after_scan(module, folder: Path):
    """After `module.scan_folder` lists the folder, green-circle.png turns into a FIFO and
    red-circle.png vanishes: the race of a folder changing under a running job."""
    real = module.scan_folder

    def scan_then_sabotage(root, **kwargs):
        found = real(root, **kwargs)
        (folder / "green-circle.png").unlink()
        os.mkfifo(folder / "green-circle.png")
        (folder / "red-circle.png").unlink()
        return found

    module.scan_folder = scan_then_sabotage
    try:
        yield
    finally:
        module.scan_folder = real


def test_a_file_that_vanishes_or_turns_into_a_fifo_after_the_scan_fails_alone_in_index_build(tmp_path, tiny_clip_dir):
    import retrieval.index

    folder = draw_good_images(tmp_path / "pictures")
    with _sabotaged_after_scan(retrieval.index, folder):
        report = build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    assert report.files == 1
    assert sorted(Path(reason.split(":")[0]).name for reason in report.failed) == ["green-circle.png", "red-circle.png"]


def test_a_file_that_vanishes_or_turns_into_a_fifo_after_the_scan_fails_alone_in_embed(tmp_path, tiny_clip_dir):
    folder = draw_good_images(tmp_path / "pictures")
    with _sabotaged_after_scan(shards, folder):
        report = shards.embed_to_shards(folder, tmp_path / "emb", model=tiny_clip_dir, workers=0, progress=False)
    assert report.embedded == 1
    assert sorted(Path(reason.split(":")[0]).name for reason in report.failed) == ["green-circle.png", "red-circle.png"]


def test_an_unreadable_file_is_reported_not_fatal(tmp_path, tiny_clip_dir):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    folder = draw_good_images(tmp_path / "pictures")
    (folder / "red-circle.png").chmod(0)
    report = build_index(folder, tmp_path / "idx", model=tiny_clip_dir, workers=0, progress=False)
    assert report.files == 2 and "red-circle.png: cannot read" in report.failed[0]


# ---- --out: never delete what the index did not write (#4) ----


def test_build_refuses_a_folder_of_the_users_and_deletes_nothing(hazards, tmp_path, tiny_clip_dir):
    out = tmp_path / "thesis"
    (out / "v1").mkdir(parents=True)
    (out / "v1" / "thesis.txt").write_text("four years")
    (out / "v2024_notes").mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(VlmError) as error:
        build_index(hazards, out, model=tiny_clip_dir, workers=0, progress=False)
    assert (
        str(error.value)
        == f"{out} is not empty and not an index (holds notes.txt, v1/, v2024_notes/); choose an empty or new --out"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "v1", "v2024_notes"]
    assert (out / "v1" / "thesis.txt").read_text() == "four years"


def test_build_from_shards_refuses_a_folder_of_the_users(hazards, tmp_path, tiny_clip_dir):
    shards.embed_to_shards(hazards, tmp_path / "emb", model=tiny_clip_dir, workers=0, progress=False)
    out = tmp_path / "mine"
    (out / "v000001").mkdir(parents=True)
    (out / "v000001" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(VlmError, match="not empty and not an index"):
        shards.build_index_from_shards(tmp_path / "emb", out, progress=False)
    assert (out / "v000001" / "photo.jpg").exists()


def test_update_deletes_only_the_versions_it_wrote(hazards, tmp_path, tiny_clip_dir):
    index = tmp_path / "idx"
    build_index(hazards, index, model=tiny_clip_dir, workers=0, progress=False)
    for name in ("v1", "v000002", "v0000001"):  # the user's, next to the index's own folders
        (index / name).mkdir()
        (index / name / "notes.txt").write_text("mine")
    crashed = index / "v000005"  # what a crashed save leaves: a version nobody names
    shutil.copytree(store.version_dir(index, 1), crashed)

    update_index(index, workers=0, progress=False)
    manifest = store.read_manifest(index)
    assert manifest.version == 3  # not into v000002, which was there already
    assert sorted(p.name for p in index.iterdir() if p.is_dir()) == sorted(["v1", "v000002", "v0000001", "v000003"])
    assert (index / "v000002" / "notes.txt").read_text() == "mine"


def test_a_build_that_crashed_before_its_manifest_can_be_run_again(hazards, tmp_path, tiny_clip_dir):
    out = tmp_path / "idx"
    build_index(hazards, out, model=tiny_clip_dir, workers=0, progress=False)
    (out / store.MANIFEST).unlink()  # the crash: a version folder, no manifest
    report = build_index(hazards, out, model=tiny_clip_dir, workers=0, progress=False)
    assert report.files == 3 and len([p for p in out.iterdir() if p.is_dir()]) == 1


# ---- one writer at a time (#5) ----


@contextlib.contextmanager
def _held(folder: Path, lock: str = store.LOCK):
    with open(folder / lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def test_a_second_writer_fails_at_once_with_one_line(hazards, tmp_path, tiny_clip_dir, capsys):
    index = tmp_path / "idx"
    build_index(hazards, index, model=tiny_clip_dir, workers=0, progress=False)
    with _held(index):
        code, out, err = _run(capsys, "index", "update", index, "--workers", 0)
        assert (code, err) == (2, f"vlmstack: error: another vlmstack is writing {index}; wait for it to finish\n")
    (tmp_path / "new").mkdir()
    with _held(tmp_path / "new"):  # a build that has not written its manifest yet
        with pytest.raises(VlmError, match="another vlmstack is writing"):
            build_index(hazards, tmp_path / "new", model=tiny_clip_dir, workers=0, progress=False)


def _holds_lock(pid: int, index: Path) -> bool:
    """Whether process `pid` holds the writer lock of `index` (read from /proc/locks, without
    touching the lock: probing it with flock could make the other writer fail)."""
    try:
        inode = (index / store.LOCK).stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and fields[4] == str(pid) and fields[5].endswith(f":{inode}"):
            return True
    return False


def test_an_update_paused_while_another_runs_leaves_a_consistent_index(hazards, tmp_path, tiny_clip_dir, capsys):
    index = tmp_path / "idx"
    build_index(hazards, index, model=tiny_clip_dir, workers=0, progress=False)
    draw_shape("red", "rectangle").save(hazards / "new.png")
    first = subprocess.Popen(
        [sys.executable, "-m", "vlm.cli", "index", "update", str(index), "--workers", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while first.poll() is None and not _holds_lock(first.pid, index):
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        assert _holds_lock(first.pid, index), "the first update finished before it could be paused, or took no lock"

        draw_shape("green", "rectangle").save(hazards / "newer.png")
        code, _, err = _run(capsys, "index", "update", index, "--workers", 0)
        assert (code, err) == (2, f"vlmstack: error: another vlmstack is writing {index}; wait for it to finish\n")
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=50)
    assert first.returncode == 0, err

    manifest = store.read_manifest(index)
    searcher = Searcher.open(index)
    assert searcher.count == manifest.count == len(store.read_data(index, manifest).hashes)
    assert len(searcher.search_text("a red shape", k=10)) == manifest.count
    report = update_index(index, workers=0, progress=False)  # the lock is free again
    assert report.files == 5 and report.failed and not report.changed


# ---- a damaged index or embeddings folder is one line (#9) ----


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_dir) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    draw_good_images(folder)
    build_index(folder, folder.parent / "built-idx", model=tiny_clip_dir, workers=0, progress=False)
    return folder.parent / "built-idx"


def _manifest_edit(**fields):
    def edit(index: Path):
        data = json.loads((index / store.MANIFEST).read_text())
        data.update(fields)
        (index / store.MANIFEST).write_text(json.dumps(data))

    return edit


def _meta(index: Path) -> Path:
    return store.version_dir(index, store.read_manifest(index).version) / "meta.sqlite"


def _delete_file_rows(index: Path):
    with sqlite3.connect(_meta(index)) as db:
        db.execute("DELETE FROM files WHERE path = 'red-circle.png'")


def _truncate_vectors(index: Path):
    path = _meta(index).with_name("vectors.npy")
    path.write_bytes(path.read_bytes()[:200])


DAMAGE = {
    "root null": (_manifest_edit(root=None), "root"),
    "model a number": (_manifest_edit(model=12345), "model"),
    "version a word": (_manifest_edit(version="abc"), "version"),
    "version negative": (_manifest_edit(version=-1), "version"),
    "dim a bool": (_manifest_edit(dim=True), "dim"),
    "count negative": (_manifest_edit(count=-3), "count"),
    "nprobe a word": (_manifest_edit(search_params={"nprobe": "x"}), "nprobe"),
    "unknown search parameter": (_manifest_edit(search_params={"speed": 3}), "speed"),
    "unknown source": (_manifest_edit(source="zip"), "source"),
    "unknown field": (_manifest_edit(colour="red"), "colour"),
    "manifest a list": (lambda index: (index / store.MANIFEST).write_text("[]"), "manifest"),
    "random meta.sqlite": (lambda index: _meta(index).write_bytes(os.urandom(4096)), "meta.sqlite"),
    "empty meta.sqlite": (lambda index: _meta(index).write_bytes(b""), "meta.sqlite"),
    "file rows deleted": (_delete_file_rows, "meta.sqlite"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_index_is_one_line_for_search_and_update(damage, built, tmp_path, capsys):
    index = tmp_path / "idx"
    shutil.copytree(built, index)
    edit, named = DAMAGE[damage]
    edit(index)
    for argv in (["search", index, "red"], ["index", "update", index, "--workers", 0]):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and named in one_error_line(err), err


def test_truncated_vectors_are_one_line_for_update(built, tmp_path, capsys):
    index = tmp_path / "idx"
    shutil.copytree(built, index)
    _truncate_vectors(index)
    code, out, err = _run(capsys, "index", "update", index, "--workers", 0)
    assert code == 2 and "vectors.npy" in one_error_line(err), err


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_clip_dir) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pictures")
    draw_good_images(folder)
    shards.embed_to_shards(folder, folder.parent / "built-emb", model=tiny_clip_dir, workers=0, progress=False)
    return folder, folder.parent / "built-emb"


@pytest.mark.parametrize(
    "field, value",
    [("shard_size", 0), ("shard_size", -1), ("shard_size", "x"), ("dim", "128"), ("count", None), ("kind", "zip")],
)
def test_a_damaged_embeddings_manifest_is_one_line(field, value, embedded, tmp_path, tiny_clip_dir, capsys):
    folder, emb = embedded
    shutil.copytree(emb, tmp_path / "emb")
    data = json.loads((emb / shards.MANIFEST).read_text())
    (tmp_path / "emb" / shards.MANIFEST).write_text(json.dumps({**data, field: value}))
    for argv in (
        ["index", "build", tmp_path / "emb", "--out", tmp_path / "idx"],
        ["embed", folder, "--out", tmp_path / "emb", "--model", tiny_clip_dir],
    ):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and field in one_error_line(err), err


def test_a_damaged_shard_is_one_line(embedded, tmp_path, capsys):
    shutil.copytree(embedded[1], tmp_path / "emb")
    (tmp_path / "emb" / "00000.jsonl").write_text('{"path": "a.png"}\n')
    code, out, err = _run(capsys, "index", "build", tmp_path / "emb", "--out", tmp_path / "idx")
    assert code == 2 and "00000.jsonl line 1" in one_error_line(err), err


@pytest.mark.parametrize("shard_size", [0, -1])
def test_embed_refuses_a_shard_size_below_one(shard_size, tmp_path, tiny_clip_dir):
    folder = draw_good_images(tmp_path / "pictures")
    with pytest.raises(VlmError, match="shard_size"):
        shards.embed_to_shards(
            folder, tmp_path / "emb", model=tiny_clip_dir, shard_size=shard_size, workers=0, progress=False
        )
    assert not (tmp_path / "emb").exists()


def test_embed_refuses_a_folder_of_the_users_and_a_second_writer(hazards, tmp_path, tiny_clip_dir):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "00000.jsonl").write_text("my own file\n")
    with pytest.raises(VlmError, match="not empty and not an embeddings folder"):
        shards.embed_to_shards(hazards, mine, model=tiny_clip_dir, workers=0, progress=False)
    assert (mine / "00000.jsonl").read_text() == "my own file\n" and sorted(p.name for p in mine.iterdir()) == [
        "00000.jsonl"
    ]
    emb = tmp_path / "emb"
    emb.mkdir()
    with _held(emb, shards.LOCK):
        with pytest.raises(VlmError, match=f"another vlmstack is writing {emb}"):
            shards.embed_to_shards(hazards, emb, model=tiny_clip_dir, workers=0, progress=False)
    assert shards.embed_to_shards(hazards, emb, model=tiny_clip_dir, workers=0, progress=False).embedded == len(
        GOOD_IMAGES
    )


def test_a_search_opened_while_an_update_commits_reads_the_new_version(hazards, tmp_path, tiny_clip_dir, monkeypatch):
    index = tmp_path / "idx"
    build_index(hazards, index, model=tiny_clip_dir, workers=0, progress=False)
    draw_shape("green", "rectangle", offset=5).save(hazards / "new.png")
    read_faiss, calls = store.read_faiss, []

    def update_then_read(index_dir, manifest):  # the update commits, and deletes this version, mid-open
        calls.append(manifest.version)
        if len(calls) == 1:
            update_index(index, workers=0, progress=False)
        return read_faiss(index_dir, manifest)

    monkeypatch.setattr(store, "read_faiss", update_then_read)
    searcher = Searcher.open(index)
    assert calls == [1, 2] and searcher.count == len(GOOD_IMAGES) + 1
