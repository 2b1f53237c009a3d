"""Build and update an image index of a folder.

    vlmstack index build ~/Pictures --out ~/pictures.index [--model M] [--index-spec S]
    vlmstack index update ~/pictures.index

An update re-walks the folder and embeds only files that are new or changed: a file
whose size and modification time are as indexed keeps its content hash; any other is
hashed again, and counts as changed only if its bytes did. Files that are gone are
dropped; a file byte-identical to one already indexed shares its vector instead of
adding another. Anything that cannot be read (a corrupt image, a FIFO, a dangling link,
a name that is not UTF-8, a file that vanished mid-run) is skipped and named in the
report, never fatal. One process at a time writes an index (store.writer_lock).
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval import spec as index_spec
from retrieval import store
from retrieval.scan import FileInfo, content_hash, scan_folder
from vlm.clip import Clip, load_clip
from vlm.data import webdataset
from vlm.embedding import embed_images
from vlm.errors import ImageError, VlmError
from vlm.images import IMAGE_EXTENSIONS
from vlm.progress import progress_bar

log = logging.getLogger(__name__)
DEFAULT_MODEL = "clip-easyvqa"


@dataclass
class IndexReport:
    added: int = 0  # files new to the index
    changed: int = 0  # files whose bytes changed, re-embedded
    unchanged: int = 0  # files with the same bytes as before (a new mtime alone is not a change)
    removed: int = 0  # files dropped from the index: gone from the folder, or unreadable now
    duplicates: int = 0  # files sharing the content of another (not embedded twice)
    failed: list[str] = field(default_factory=list)  # reasons, each naming a file that was skipped
    count: int = 0  # distinct images in the index now
    files: int = 0  # files in the index now
    index_spec: str = ""
    shortfall: str = ""  # one line when search tuning did not reach its recall target
    seconds: float = 0.0

    def summary(self) -> str:
        text = (
            f"{self.files} files ({self.count} distinct images) indexed with {self.index_spec}: "
            f"{self.added} added, {self.changed} changed, {self.unchanged} unchanged, {self.removed} removed, "
            f"{self.duplicates} duplicates, {len(self.failed)} unreadable, in {self.seconds:.1f} s"
        )
        text += "".join(f"\n  unreadable: {reason}" for reason in self.failed)
        return text + (f"\nwarning: {self.shortfall}" if self.shortfall else "")


def build_index(
    folder: str | Path,
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    spec: str = "auto",
    max_memory: int = 0,
    backend: str = "faiss",
    milvus_uri: str = "",
    batch_size: int = 256,
    workers: int = 2,
    engine: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
) -> IndexReport:
    """Index every image under `folder` into the new index directory `out`.

    `max_memory`: bytes the FAISS structure may take in RAM, which decides the "auto"
    spec (spec.auto_spec); 0 = half the machine's RAM. Kept for updates.
    `backend`: "faiss" (the index directory holds the index) or "milvus" (the vectors go
    to a collection at `milvus_uri`, see retrieval.milvus).
    `workers`: DataLoader decoding processes (local engine) or Ray actors (engine "ray",
    on the cluster at `ray_address`, default a local Ray).

    Raises:
        VlmError: `folder` has no readable images or holds webdataset shards; `out`
            already holds an index, holds files of the user's, or is being written by
            another process; `spec` is not a FAISS index.
    """
    folder, out = Path(folder).resolve(), Path(out)
    if not folder.is_dir():
        raise VlmError(f"{folder}: not a folder")
    if webdataset.is_webdataset(folder):
        raise VlmError(
            f"{folder}: webdataset shards are indexed in two steps: `vlmstack embed {folder} --out EMB`, then `vlmstack index build EMB`"
        )
    store.check_new_index(out)  # before loading the model
    milvus_uri = check_backend(backend, milvus_uri, spec)
    clip = load_clip(model)
    index_spec.check_spec(spec, clip.embed_dim)  # before the long part, not after it
    with store.new_index(out):
        manifest = store.Manifest(
            root=str(folder),
            model=model,
            model_fingerprint=clip.fingerprint,
            dim=clip.embed_dim,
            index_spec=spec,
            max_memory=max_memory,
            backend=backend,
            milvus_uri=milvus_uri,
        )
        empty = store.IndexData(np.zeros((0, clip.embed_dim), np.float32), [], [])
        embed = embedder(
            engine, clip, model, batch_size=batch_size, workers=workers, ray_address=ray_address, progress=progress
        )
        return _sync(out, manifest, empty, embed, progress=progress, new=True)


def update_index(
    index_dir: str | Path, *, batch_size: int = 256, workers: int = 2, progress: bool = True
) -> IndexReport:
    """Bring the index up to date with its folder, embedding only what changed.

    Raises:
        VlmError: not an index, a damaged one, one built from shards or with weights that
            changed since, its Milvus cannot be reached, or another process is writing it.
    """
    index_dir = Path(index_dir)
    store.read_manifest(index_dir)  # "not an index" before touching the directory
    with store.writer_lock(index_dir):
        manifest = store.read_manifest(index_dir)  # as it is now that no one else writes
        if manifest.source != "folder":
            raise VlmError(
                f"{index_dir} was built from {manifest.source} shards, which it cannot re-scan; embed and build again"
            )
        if manifest.backend == "milvus":  # unreachable: one line now, not after embedding
            from retrieval import milvus

            milvus.connect(manifest.milvus_uri)
        clip = load_clip(manifest.model)
        if clip.fingerprint != manifest.model_fingerprint:
            raise VlmError(
                f"{index_dir} was built with {manifest.model} (weights {manifest.model_fingerprint}), "
                f"which now loads as weights {clip.fingerprint}; rebuild the index"
            )
        data = store.read_data(index_dir, manifest)
        embed = embedder(
            "local", clip, manifest.model, batch_size=batch_size, workers=workers, ray_address=None, progress=progress
        )
        return _sync(index_dir, manifest, data, embed, progress=progress, new=False)


def embedder(engine: str, clip: Clip, model: str, *, batch_size: int, workers: int, ray_address, progress: bool):
    """sources -> Embeddings, with `clip` in this process, or on Ray actors that each load `model`."""
    if engine == "ray":
        from vlm import ray_engine

        return lambda sources: ray_engine.embed_images(
            model, sources, batch_size=batch_size, workers=workers, address=ray_address, progress=progress
        )
    if engine != "local":
        raise VlmError(f"unknown engine {engine!r}; choose from local, ray")
    return lambda sources: embed_images(clip, sources, batch_size=batch_size, workers=workers, progress=progress)


def _sync(out: Path, manifest: store.Manifest, old: store.IndexData, embed, *, progress, new) -> IndexReport:
    """Make the index at `out` hold exactly the readable images of `manifest.root`,
    starting from `old` (empty for a new index), and save it as a new version."""
    started = time.perf_counter()
    root = Path(manifest.root)
    if not root.is_dir():
        raise VlmError(f"{root}: the indexed folder does not exist")
    scan = scan_folder(root)
    if new and not scan.files and not scan.skipped:
        raise VlmError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    report = IndexReport(failed=list(scan.skipped))
    old_files = {path: (mtime, size, old.hashes[cid]) for path, mtime, size, cid in old.files}
    content_of = _contents(root, scan.files, old_files, report.failed, progress=progress)
    files = [info for info in scan.files if info.path in content_of]

    # Embed each new content once (the first file carrying it).
    old_vector = {h: old.vectors[i] for i, h in enumerate(old.hashes)}
    first_file: dict[str, FileInfo] = {}
    for info in files:
        if content_of[info.path] not in old_vector:
            first_file.setdefault(content_of[info.path], info)
    pending = list(first_file.items())
    embedded = embed([str(root / info.path) for _, info in pending])
    new_vector = {pending[i][0]: vector for i, vector in zip(embedded.indices, embedded.vectors.numpy())}
    unreadable = {pending[i][0] for i, _ in embedded.failures}
    report.failed += [reason for _, reason in embedded.failures]

    # The new contents table: every content still referenced by a readable file.
    hashes, vectors, kept_files, content_id = [], [], [], {}
    for info in files:
        digest = content_of[info.path]
        if digest in unreadable:
            if info is not first_file[digest]:
                report.failed.append(
                    f"{root / info.path}: same bytes as {first_file[digest].path}, which cannot be read"
                )
            continue
        if digest not in content_id:
            content_id[digest] = len(hashes)
            hashes.append(digest)
            vectors.append(old_vector[digest] if digest in old_vector else new_vector[digest])
        kept_files.append((info.path, info.mtime, info.size, content_id[digest]))
        previous = old_files.get(info.path)
        report.added += previous is None
        report.unchanged += previous is not None and previous[2] == digest
        report.changed += previous is not None and previous[2] != digest
    report.removed = len(set(old_files) - {path for path, *_ in kept_files})
    report.duplicates = len(kept_files) - len(hashes)
    if new and not hashes:
        first = f": {report.failed[0]}" if report.failed else ""
        raise VlmError(f"{root}: none of the {len(report.failed)} images could be read{first}")

    data = store.IndexData(np.asarray(vectors, np.float32).reshape(-1, manifest.dim), hashes, kept_files)
    index, tuning = search_index(out, manifest, data.vectors)
    store.save(out, manifest, data, index)
    report.count, report.files, report.index_spec = len(hashes), len(kept_files), manifest.built_spec
    report.shortfall = tuning.shortfall or ""
    report.seconds = time.perf_counter() - started
    return report


def check_backend(backend: str, milvus_uri: str, spec: str) -> str:
    """The Milvus URI to record (a Lite file made absolute), after checking that Milvus
    answers there — before any long work; "" for FAISS.

    Raises:
        VlmError: an unknown backend, a missing or unreachable URI, or an --index-spec
            (a FAISS setting) with milvus.
    """
    if backend == "faiss":
        if milvus_uri:
            raise VlmError("--milvus-uri needs --backend milvus")
        return ""
    if backend != "milvus":
        raise VlmError(f"unknown backend {backend!r}; choose from faiss, milvus")
    if not milvus_uri:
        raise VlmError("--backend milvus needs --milvus-uri (http://HOST:19530, or a Milvus Lite file like ./index.db)")
    if spec != "auto":
        raise VlmError("--index-spec is a FAISS setting; with --backend milvus leave it out")
    from retrieval import milvus

    milvus_uri = milvus.resolve_uri(milvus_uri)
    milvus.connect(milvus_uri)
    return milvus_uri


def search_index(out: Path, manifest: store.Manifest, vectors: np.ndarray):
    """(index, spec.Tuning): what searches `vectors` for the index at `out` — a FAISS index
    (the manifest's spec) or a new Milvus collection — with its search breadth tuned.
    Sets the manifest's built_spec and search_params."""
    if manifest.backend == "milvus":
        from retrieval import milvus

        prefix = manifest.collection.rsplit("_", 1)[0] if manifest.collection else milvus.collection_prefix(out)
        index = milvus.write_collection(
            manifest.milvus_uri, prefix, vectors, model=manifest.model, fingerprint=manifest.model_fingerprint
        )
        manifest.built_spec = f"milvus {index.index_type}"
    else:
        manifest.built_spec = choose_spec(manifest, len(vectors))
        index = index_spec.build(vectors, manifest.built_spec)
    tuning = index_spec.tune_search(index, vectors)
    manifest.search_params = tuning.params
    return index, tuning


def choose_spec(manifest: store.Manifest, count: int) -> str:
    """The manifest's spec, or for "auto" the one for `count` vectors within its memory
    budget (chosen again at every update, as the index grows)."""
    if manifest.index_spec != "auto":
        return manifest.index_spec
    return index_spec.auto_spec(count, manifest.dim, max_memory=manifest.max_memory or None)


def _contents(
    root: Path, files: list[FileInfo], old_files: dict, failed: list[str], *, progress: bool
) -> dict[str, str]:
    """path -> sha256 of each readable file. A file indexed with the same size and mtime
    keeps its recorded hash; the others are read. Files that cannot be read are left out
    and their reasons appended to `failed`."""
    content_of, to_hash = {}, []
    for info in files:
        previous = old_files.get(info.path)
        if previous and previous[:2] == (info.mtime, info.size):
            content_of[info.path] = previous[2]
        else:
            to_hash.append(info)
    for info in progress_bar(to_hash, desc="hashing", unit="file", disable=not progress or len(to_hash) < 1000):
        try:
            content_of[info.path] = content_hash(root / info.path)
        except ImageError as e:
            failed.append(str(e))
    return content_of
