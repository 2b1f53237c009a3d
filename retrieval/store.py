"""The on-disk index directory, saved atomically as numbered versions.

    INDEX/
      manifest.json        which version is current; model name and fingerprint, dim,
                           FAISS spec and search parameters, counts, format version
      v000003/
        index.faiss        the FAISS index; its ids are content ids
        vectors.npy        (contents, dim) float32 embeddings, so an update re-indexes
                           without re-embedding
        meta.sqlite        contents(id, sha256) and files(path, mtime, size, content_id)

A save writes a complete new version folder, then switches manifest.json to it in one
atomic rename, then deletes older versions. A crash at any point leaves the previous
manifest pointing at the previous, complete version.
"""

import json
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from vlm.atomic import write_json
from vlm.errors import VlmError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    root: str  # absolute path of the indexed folder (of the shards, for webdataset)
    model: str  # the model spec the index was built with (as given to load_clip)
    model_fingerprint: str  # hash of that model's weights
    dim: int  # embedding dimension
    index_spec: str  # what was asked for: "auto" or a FAISS index_factory string
    built_spec: str = ""  # the index_factory string actually built ("auto" resolved by size)
    search_params: dict = field(default_factory=dict)  # e.g. {"nprobe": 16}
    source: str = "folder"  # "folder" (updatable) or "webdataset" (paths are shard.tar#member)
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
    """Raises VlmError when the directory is not a (readable, compatible) index."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise VlmError(f"{index_dir}: not an index (no {MANIFEST}); build one with `vlmstack index build`")
    try:
        manifest = Manifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise VlmError(f"{path}: corrupt manifest ({e})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise VlmError(f"{index_dir}: index format {manifest.format_version}, this vlmstack reads {FORMAT_VERSION}; rebuild it")
    return manifest


def read_faiss(index_dir: Path, manifest: Manifest) -> faiss.Index:
    path = version_dir(index_dir, manifest.version) / "index.faiss"
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise VlmError(f"{path}: corrupt or missing FAISS file ({str(e).splitlines()[0]})") from None
    if index.ntotal != manifest.count or index.d != manifest.dim:
        raise VlmError(f"{path}: holds {index.ntotal} x {index.d} vectors, manifest says {manifest.count} x {manifest.dim}")
    return index


def connect_meta(index_dir: Path, manifest: Manifest) -> sqlite3.Connection:
    """Read-only connection to the metadata store, usable from several threads."""
    path = version_dir(index_dir, manifest.version) / "meta.sqlite"
    if not path.is_file():
        raise VlmError(f"{path}: missing metadata store")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)


def read_data(index_dir: Path, manifest: Manifest) -> IndexData:
    folder = version_dir(index_dir, manifest.version)
    vectors = np.load(folder / "vectors.npy")
    with connect_meta(index_dir, manifest) as db:
        hashes = [h for (h,) in db.execute("SELECT sha256 FROM contents ORDER BY id")]
        files = list(db.execute("SELECT path, mtime, size, content_id FROM files ORDER BY path"))
    return IndexData(vectors, hashes, files)


def save(index_dir: Path, manifest: Manifest, data: IndexData, index: faiss.Index) -> Manifest:
    """Write `data` and `index` as the next version and make it current. Returns the new
    manifest (counts, version and timestamps filled in)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    previous = _current_version(index_dir)
    manifest.version = previous + 1
    manifest.count, manifest.files = len(data.hashes), len(data.files)
    manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest.created = manifest.created or manifest.updated
    folder = version_dir(index_dir, manifest.version)
    shutil.rmtree(folder, ignore_errors=True)  # leftovers of a crashed save
    folder.mkdir()
    np.save(folder / "vectors.npy", np.ascontiguousarray(data.vectors, dtype=np.float32))
    _write_meta(folder / "meta.sqlite", data)
    faiss.write_index(index, str(folder / "index.faiss"))
    write_json(index_dir / MANIFEST, asdict(manifest))  # the commit point
    for old in index_dir.glob("v[0-9]*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return manifest


def _current_version(index_dir: Path) -> int:
    try:
        return json.loads((index_dir / MANIFEST).read_text())["version"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return max((int(p.name[1:]) for p in index_dir.glob("v[0-9]*")), default=0)


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
