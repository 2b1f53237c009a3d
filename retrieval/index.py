"""Build and update an image index of a folder.

    vlmstack index build ~/Pictures --out ~/pictures.index [--model M] [--index-spec S]
    vlmstack index update ~/pictures.index

An update re-walks the folder and embeds only files that are new or changed (by size
and modification time, then by content hash); files that are gone are dropped; a file
byte-identical to one already indexed shares its vector instead of adding another.
Unreadable images are skipped and listed in the report, never fatal.
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval import spec as index_spec
from retrieval import store
from retrieval.scan import FileInfo, scan_folder
from vlm.clip import Clip, load_clip
from vlm.data import webdataset
from vlm.embedding import embed_images
from vlm.errors import VlmError
from vlm.hashing import sha256_file
from vlm.images import IMAGE_EXTENSIONS
from vlm.progress import progress_bar

log = logging.getLogger(__name__)
DEFAULT_MODEL = "clip-easyvqa"


@dataclass
class IndexReport:
    added: int = 0  # new files embedded
    changed: int = 0  # files whose content changed, re-embedded
    unchanged: int = 0  # files kept as they were
    removed: int = 0  # files gone from the folder
    duplicates: int = 0  # files sharing the content of another (not embedded twice)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    count: int = 0  # distinct images in the index now
    files: int = 0  # files in the index now
    index_spec: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        text = (
            f"{self.files} files ({self.count} distinct images) indexed with {self.index_spec}: "
            f"{self.added} added, {self.changed} changed, {self.unchanged} unchanged, {self.removed} removed, "
            f"{self.duplicates} duplicates, {len(self.failed)} unreadable, in {self.seconds:.1f} s"
        )
        return text + "".join(f"\n  unreadable: {reason}" for _, reason in self.failed)


def build_index(
    folder: str | Path,
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    spec: str = "auto",
    batch_size: int = 256,
    workers: int = 2,
    engine: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
) -> IndexReport:
    """Index every image under `folder` into the new index directory `out`.

    `workers`: DataLoader decoding processes (local engine) or Ray actors (engine "ray",
    on the cluster at `ray_address`, default a local Ray).

    Raises:
        VlmError: `folder` has no readable images or holds webdataset shards, `out`
            already holds an index, or `spec` is not a FAISS index.
    """
    folder, out = Path(folder).resolve(), Path(out)
    if (out / store.MANIFEST).exists():
        raise VlmError(f"{out} already holds an index; use `vlmstack index update {out}` or another --out")
    if webdataset.is_webdataset(folder):
        raise VlmError(f"{folder}: webdataset shards are indexed in two steps: `vlmstack embed {folder} --out EMB`, then `vlmstack index build EMB`")
    clip = load_clip(model)
    index_spec.check_spec(spec, clip.embed_dim)  # before the long part, not after it
    manifest = store.Manifest(
        root=str(folder), model=model, model_fingerprint=clip.fingerprint, dim=clip.embed_dim, index_spec=spec
    )
    empty = store.IndexData(np.zeros((0, clip.embed_dim), np.float32), [], [])
    embed = embedder(engine, clip, model, batch_size=batch_size, workers=workers, ray_address=ray_address, progress=progress)
    return _sync(out, manifest, empty, embed, progress=progress, new=True)


def update_index(index_dir: str | Path, *, batch_size: int = 256, workers: int = 2, progress: bool = True) -> IndexReport:
    """Bring the index up to date with its folder, embedding only what changed."""
    manifest = store.read_manifest(index_dir)
    if manifest.source != "folder":
        raise VlmError(f"{index_dir} was built from {manifest.source} shards, which it cannot re-scan; embed and build again")
    clip = load_clip(manifest.model)
    if clip.fingerprint != manifest.model_fingerprint:
        raise VlmError(
            f"{index_dir} was built with {manifest.model} (weights {manifest.model_fingerprint}), "
            f"which now loads as weights {clip.fingerprint}; rebuild the index"
        )
    data = store.read_data(index_dir, manifest)
    embed = embedder("local", clip, manifest.model, batch_size=batch_size, workers=workers, ray_address=None, progress=progress)
    return _sync(Path(index_dir), manifest, data, embed, progress=progress, new=False)


def embedder(engine: str, clip: Clip, model: str, *, batch_size: int, workers: int, ray_address, progress: bool):
    """sources -> Embeddings, with `clip` in this process, or on Ray actors that each load `model`."""
    if engine == "ray":
        from vlm import ray_engine

        return lambda sources: ray_engine.embed_images(model, sources, batch_size=batch_size, workers=workers, address=ray_address, progress=progress)
    if engine != "local":
        raise VlmError(f"unknown engine {engine!r}; choose from local, ray")
    return lambda sources: embed_images(clip, sources, batch_size=batch_size, workers=workers, progress=progress)


def _sync(out: Path, manifest: store.Manifest, old: store.IndexData, embed, *, progress, new) -> IndexReport:
    started = time.perf_counter()
    root = Path(manifest.root)
    if not root.is_dir():
        raise VlmError(f"{root}: the indexed folder does not exist")
    files = scan_folder(root)
    if new and not files:
        raise VlmError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    report = IndexReport()
    old_files = {path: (mtime, size, cid) for path, mtime, size, cid in old.files}
    report.removed = len(set(old_files) - {f.path for f in files})

    # Content of every file: unchanged files keep theirs; others are hashed.
    content_of: dict[str, str] = {}
    to_hash = []
    for info in files:
        previous = old_files.get(info.path)
        if previous and previous[:2] == (info.mtime, info.size):
            content_of[info.path] = old.hashes[previous[2]]
            report.unchanged += 1
        else:
            to_hash.append(info)
    for info in progress_bar(to_hash, desc="hashing", unit="file", disable=not progress or len(to_hash) < 1000):
        content_of[info.path] = sha256_file(root / info.path)

    # Embed each new content once (the first file carrying it).
    old_vector = {h: old.vectors[i] for i, h in enumerate(old.hashes)}
    first_file: dict[str, FileInfo] = {}
    for info in to_hash:
        digest = content_of[info.path]
        if digest not in old_vector:
            first_file.setdefault(digest, info)
        report.added += info.path not in old_files
        report.changed += info.path in old_files
    pending = list(first_file.items())
    embedded = embed([str(root / info.path) for _, info in pending])
    new_vector = {pending[i][0]: vector for i, vector in zip(embedded.indices, embedded.vectors.numpy())}
    unreadable = {pending[i][0] for i, _ in embedded.failures}
    report.failed = [(pending[i][1].path, reason) for i, reason in embedded.failures]

    # The new contents table: every content still referenced by a readable file.
    hashes, vectors, kept_files, content_id = [], [], [], {}
    for info in files:
        digest = content_of[info.path]
        if digest in unreadable:
            continue
        if digest not in content_id:
            content_id[digest] = len(hashes)
            hashes.append(digest)
            vectors.append(old_vector[digest] if digest in old_vector else new_vector[digest])
        kept_files.append((info.path, info.mtime, info.size, content_id[digest]))
    report.duplicates = len(kept_files) - len(hashes)
    report.added -= sum(1 for path, _ in report.failed if path not in old_files)
    report.changed -= sum(1 for path, _ in report.failed if path in old_files)
    if new and not hashes:
        raise VlmError(f"{root}: none of the {len(files)} images could be read")

    data = store.IndexData(np.asarray(vectors, np.float32).reshape(-1, manifest.dim), hashes, kept_files)
    # "auto" is chosen again at every update, as the index grows.
    spec = index_spec.auto_spec(len(hashes), manifest.dim) if manifest.index_spec == "auto" else manifest.index_spec
    manifest.built_spec = spec
    index = index_spec.build_faiss(data.vectors, spec)
    manifest.search_params = index_spec.tune_search(index, data.vectors)
    store.save(out, manifest, data, index)
    report.count, report.files, report.index_spec = len(hashes), len(kept_files), spec
    report.seconds = time.perf_counter() - started
    return report
