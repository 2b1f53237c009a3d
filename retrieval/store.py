"""The on-disk index directory, saved atomically as numbered versions.

    INDEX/
      manifest.json        which version is current; model name and fingerprint, dim,
                           FAISS spec and search parameters, counts, format version
      .writer.lock         held (flock) by the one process building or updating the index
      v000003/
        index.faiss        the FAISS index; its ids are content ids
        vectors.npy        (contents, dim) float32 embeddings, so an update re-indexes
                           without re-embedding, and a lossy index (SQ, PQ) re-ranks its
                           candidates exactly (memory-mapped, see spec.Refined)
        meta.sqlite        contents(id, sha256) and files(path, mtime, size, content_id)

A build from shards streams the vectors into INDEX/.vectors.tmp.npy (never all in RAM);
the save moves that file into the version folder. A save writes a complete new version folder under a name no entry has yet, then switches
manifest.json to it in one atomic rename, then deletes the older versions. A crash at any
point leaves the previous manifest pointing at the previous, complete version.

The directory may hold things the index did not write (the user's, or a mistyped --out):
only folders named v + 6 digits that hold nothing but index files count as versions, and
nothing else is ever deleted. Everything read back (the manifest's fields, the metadata
store, the vectors) is checked where it is read: a damaged index is a one-line VlmError.
"""

import contextlib
import json
import os
import re
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from retrieval.spec import MAX_SEARCH_BREADTH, SEARCH_PARAMETERS, Refined
from vlm.atomic import write_json
from vlm.data.folders import printable
from vlm.errors import VlmError
from vlm.locks import only_writer
from vlm.schema import from_dict

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".writer.lock"
SOURCES = ("folder", "webdataset")
BACKENDS = ("faiss", "milvus")
VERSION_NAME = re.compile(r"v[0-9]{6}")
VERSION_FILES = {"index.faiss", "vectors.npy", "meta.sqlite", "meta.sqlite-journal"}
VECTORS_TMP = ".vectors.tmp.npy"  # a streamed build's vectors, until save moves them into a version
REBUILD = "rebuild the index with `vlmstack index build`"


@dataclass
class Manifest:
    root: str  # absolute path of the indexed folder (of the shards, for webdataset)
    model: str  # the model spec the index was built with (as given to load_clip)
    model_fingerprint: str  # hash of that model's weights
    dim: int  # embedding dimension
    index_spec: str  # what was asked for: "auto" or a FAISS index_factory string
    built_spec: str = ""  # the index_factory string actually built ("auto" resolved by size)
    max_memory: int = 0  # bytes the FAISS structure may take in RAM (spec.auto_spec); 0: half the machine's
    search_params: dict = field(default_factory=dict)  # e.g. {"nprobe": 16}; "k_factor": re-ranked (spec.Refined)
    source: str = "folder"  # "folder" (updatable) or "webdataset" (paths are shard.tar#member)
    backend: str = "faiss"  # where the vectors are searched: "faiss" (index.faiss) or "milvus" (retrieval.milvus)
    milvus_uri: str = ""  # the Milvus server (http://host:port) or Milvus Lite file (.db), for backend milvus
    collection: str = ""  # the Milvus collection holding this version's vectors
    count: int = 0  # distinct images (contents) indexed
    files: int = 0  # files indexed; > count when byte-identical duplicates exist
    version: int = 0  # current version folder number
    format_version: int = FORMAT_VERSION
    created: str = ""
    updated: str = ""


@dataclass
class IndexData:
    """Everything an index version holds except the FAISS structure."""

    vectors: np.ndarray  # (contents, dim) float32
    hashes: list[str]  # content id -> sha256 of the file bytes
    files: list[tuple[str, float, int, int]]  # (relative path, mtime, size, content id)


def version_dir(index_dir: Path, version: int) -> Path:
    return Path(index_dir) / f"v{version:06d}"


def read_manifest(index_dir: Path) -> Manifest:
    """The index's manifest, every field checked for type and range.

    Raises:
        VlmError: the directory is not an index, or its manifest is damaged or of
            another format version; the message names the field.
    """
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise VlmError(f"{index_dir}: not an index (no {MANIFEST}); build one with `vlmstack index build`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8, not JSON
        raise VlmError(f"{path}: corrupt manifest ({e}); {REBUILD}") from None
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise VlmError(
            f"{index_dir}: index format {data['format_version']!r}, this vlmstack reads {FORMAT_VERSION}; {REBUILD}"
        )
    try:
        manifest = from_dict(Manifest, data, str(path))  # types, unknown and missing fields
    except VlmError as e:
        raise VlmError(f"{e}; {REBUILD}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise VlmError(f"{path}: {problem}; {REBUILD}")
    return manifest


def _manifest_problem(m: Manifest) -> str | None:
    """What is out of range in a manifest whose fields have the right types, or None."""
    checks = [
        (bool(m.root) and Path(m.root).is_absolute(), f"root must be an absolute path, not {m.root!r}"),
        (bool(m.model), "model must not be empty"),
        (bool(m.index_spec), "index_spec must not be empty"),
        (m.dim >= 1, f"dim must be at least 1, not {m.dim}"),
        (m.source in SOURCES, f"source must be one of {', '.join(SOURCES)}, not {m.source!r}"),
        (m.count >= 0, f"count must not be negative, not {m.count}"),
        (m.files >= m.count and (m.count > 0 or m.files == 0), f"count {m.count} and files {m.files} disagree"),
        (m.version >= 1, f"version must be at least 1, not {m.version}"),
        (m.max_memory >= 0, f"max_memory must not be negative, not {m.max_memory}"),
        (m.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, not {m.backend!r}"),
        (
            m.backend != "milvus" or bool(m.milvus_uri and m.collection),
            "a milvus index needs milvus_uri and collection",
        ),
    ]
    for name, value in m.search_params.items():
        checks.append(
            (name in SEARCH_PARAMETERS, f"unknown search parameter {name!r} (known: {', '.join(SEARCH_PARAMETERS)})")
        )
        in_range = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEARCH_BREADTH
        checks.append(
            (in_range, f"search parameter {name} must be a whole number from 1 to {MAX_SEARCH_BREADTH}, not {value!r}")
        )
    return next((problem for ok, problem in checks if not ok), None)


def read_faiss(index_dir: Path, manifest: Manifest):
    """The version's searchable index: FAISS; a `spec.Refined` over its memory-mapped
    vectors.npy when the manifest's search parameters re-rank (`k_factor`); or, for the
    milvus backend, its checked `milvus.MilvusIndex`."""
    if manifest.backend == "milvus":
        from retrieval import milvus

        return milvus.open_collection(
            manifest.milvus_uri,
            manifest.collection,
            dim=manifest.dim,
            count=manifest.count,
            fingerprint=manifest.model_fingerprint,
            where=str(index_dir),
        )
    path = version_dir(index_dir, manifest.version) / "index.faiss"
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise VlmError(f"{path}: corrupt or missing FAISS file ({str(e).splitlines()[0]})") from None
    if index.ntotal != manifest.count or index.d != manifest.dim:
        raise VlmError(
            f"{path}: holds {index.ntotal} x {index.d} vectors, manifest says {manifest.count} x {manifest.dim}"
        )
    if "k_factor" in manifest.search_params:
        return Refined(base=index, vectors=read_vectors(index_dir, manifest, mmap=True))
    return index


def connect_meta(index_dir: Path, manifest: Manifest) -> sqlite3.Connection:
    """Read-only connection to the metadata store, usable from several threads.

    Raises:
        VlmError: the store is missing, not a database, or does not hold the manifest's
            contents (ids 0..count-1, each with at least one file) and files.
    """
    path = version_dir(index_dir, manifest.version) / "meta.sqlite"
    if not path.is_file():
        raise VlmError(f"{path}: missing metadata store; {REBUILD}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    try:
        contents = db.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM contents").fetchone()
        files = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT content_id), MIN(content_id), MAX(content_id),"
            " TOTAL(typeof(path) != 'text' OR typeof(content_id) != 'integer') FROM files"
        ).fetchone()
    except sqlite3.DatabaseError as e:
        db.close()
        raise VlmError(f"{path}: damaged metadata store ({e}); {REBUILD}") from None
    ids = (0, manifest.count - 1) if manifest.count else (None, None)
    if contents != (manifest.count, *ids) or files != (manifest.files, manifest.count, *ids, 0):
        db.close()
        raise VlmError(
            f"{path}: damaged metadata store ({contents[0]} contents and {files[0]} files, of which {files[1]} contents "
            f"have a file; the manifest says {manifest.count} and {manifest.files}); {REBUILD}"
        )
    return db


def read_data(index_dir: Path, manifest: Manifest) -> IndexData:
    """The current version's vectors and metadata (what an update starts from).

    Raises:
        VlmError: the vectors or the metadata store are damaged or disagree with the manifest.
    """
    vectors = read_vectors(index_dir, manifest)
    path = version_dir(index_dir, manifest.version) / "meta.sqlite"
    with contextlib.closing(connect_meta(index_dir, manifest)) as db:
        try:
            hashes = [h for (h,) in db.execute("SELECT sha256 FROM contents ORDER BY id")]
            files = list(db.execute("SELECT path, mtime, size, content_id FROM files ORDER BY path"))
        except sqlite3.DatabaseError as e:
            raise VlmError(f"{path}: damaged metadata store ({e}); {REBUILD}") from None
    return IndexData(vectors, hashes, files)


def read_vectors(index_dir: Path, manifest: Manifest, *, mmap: bool = False) -> np.ndarray:
    """The version's (count, dim) float32 vectors, in RAM or memory-mapped.

    Raises:
        VlmError: the file is missing, damaged, or disagrees with the manifest.
    """
    path = version_dir(index_dir, manifest.version) / "vectors.npy"
    try:
        vectors = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise VlmError(f"{path}: damaged vectors ({e}); {REBUILD}") from None
    if vectors.dtype != np.float32 or vectors.shape != (manifest.count, manifest.dim):
        raise VlmError(
            f"{path}: holds {vectors.shape} {vectors.dtype}, the manifest says ({manifest.count}, {manifest.dim}) float32; {REBUILD}"
        )
    return vectors


def writer_lock(index_dir: Path):
    """The index's writer lock (vlm/locks.py) on INDEX/.writer.lock, held while a block runs.

    Raises:
        VlmError: at once, when another process holds the lock.
    """
    return only_writer(Path(index_dir) / LOCK, busy=f"another vlmstack is writing {index_dir}; wait for it to finish")


@contextlib.contextmanager
def new_index(out: Path) -> Iterator[None]:
    """Create the index directory `out` (or take over what a crashed build left in it)
    and hold its writer lock while the block builds the index.

    Raises:
        VlmError: `out` already holds an index, holds anything an index did not write
            (named in the message), or another build is writing it.
    """
    out = Path(out)
    check_new_index(out)  # before creating anything in a folder that may be the user's
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out):
        check_new_index(out)  # another build may have finished in the meantime
        yield


def check_new_index(out: Path) -> None:
    """Raises VlmError unless `out` is absent, empty, or holds only what a crashed build
    left (see new_index)."""
    if (out / MANIFEST).exists():
        raise VlmError(
            f"{out} already holds an index; update it with `vlmstack index update {out}` or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise VlmError(f"{out} is a file; choose an empty or new --out")
    if not out.exists():
        return
    foreign = sorted(
        printable(entry.name) + "/" * entry.is_dir() for entry in out.iterdir() if not _written_by_index(entry)
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise VlmError(f"{out} is not empty and not an index (holds {shown}); choose an empty or new --out")


def _written_by_index(entry: Path) -> bool:
    """The lock, a version folder, or a half-written manifest (vlm.atomic's temporary file)."""
    if entry.name in (LOCK, VECTORS_TMP) or _is_version(entry):
        return True
    return entry.name.startswith(f".{MANIFEST}.") and entry.name.endswith(".tmp") and entry.is_file()


def _is_version(entry: Path) -> bool:
    """A folder named v + 6 digits (not a link) that holds nothing but index files."""
    if not VERSION_NAME.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
        return False
    return all(child.name in VERSION_FILES and child.is_file() and not child.is_symlink() for child in entry.iterdir())


def save(index_dir: Path, manifest: Manifest, data: IndexData, index) -> Manifest:
    """Write `data` and `index` (FAISS, a spec.Refined one, or a milvus.MilvusIndex already
    loaded, which the manifest then names) as the next version, make it current, delete
    the older versions (and older Milvus collections). Vectors memory-mapped from INDEX/.vectors.tmp.npy
    are moved, not copied. The caller holds the writer lock. Returns the new manifest
    (counts, version and timestamps filled in)."""
    index_dir = Path(index_dir)
    manifest.version = manifest.version + 1
    while os.path.lexists(version_dir(index_dir, manifest.version)):  # never write into what is there
        manifest.version += 1
    manifest.count, manifest.files = len(data.hashes), len(data.files)
    manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest.created = manifest.created or manifest.updated
    folder = version_dir(index_dir, manifest.version)
    folder.mkdir()
    streamed = index_dir / VECTORS_TMP
    if isinstance(data.vectors, np.memmap) and streamed.exists() and os.path.samefile(data.vectors.filename, streamed):
        os.replace(streamed, folder / "vectors.npy")
    else:
        np.save(folder / "vectors.npy", np.ascontiguousarray(data.vectors, dtype=np.float32))
    _write_meta(folder / "meta.sqlite", data)
    if manifest.backend == "milvus":
        manifest.collection = index.collection
    else:
        faiss.write_index(index.base if isinstance(index, Refined) else index, str(folder / "index.faiss"))
    write_json(index_dir / MANIFEST, asdict(manifest))  # the commit point
    if manifest.backend == "milvus":
        index.drop_others()
    for entry in index_dir.iterdir():
        if entry != folder and _is_version(entry):
            shutil.rmtree(entry, ignore_errors=True)
    return manifest


def _write_meta(path: Path, data: IndexData) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE TABLE contents (id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE)")
        db.execute("CREATE TABLE files (path TEXT PRIMARY KEY, mtime REAL, size INTEGER, content_id INTEGER NOT NULL)")
        db.executemany("INSERT INTO contents VALUES (?, ?)", enumerate(data.hashes))
        db.executemany("INSERT INTO files VALUES (?, ?, ?, ?)", data.files)
        db.execute("CREATE INDEX files_by_content ON files (content_id, path)")
        db.commit()
    finally:
        db.close()
