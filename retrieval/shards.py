"""Embeddings written in shards as they are computed, for collections too big to redo.

    vlmstack embed photos/ --out photos.emb [--engine ray]     # a folder or webdataset shards
    vlmstack index build photos.emb --out photos.index          # the index, from the shards

    EMB/
      embeddings.json   what is embedded: source, model + fingerprint, dim, shard size, count
      00000.jsonl       one line per input of shard 0: {"path", "mtime", "size", "sha256"},
                        plus "error" for an unreadable one
      00000.npy         (readable inputs of shard 0, dim) float32, L2-normalised

Each shard is written atomically, its .npy last: a shard counts as done once its .npy
exists. A crash loses at most the shard in progress; the same command resumes after the
last finished shard. The index reads the shards memory-mapped, one at a time.
"""

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrieval import spec as index_spec
from retrieval import store
from retrieval.index import DEFAULT_MODEL, IndexReport, check_backend, search_index
from retrieval.scan import content_hash, scan_folder
from vlm.atomic import atomic_path, write_json, write_text
from vlm.clip import load_clip
from vlm.data import webdataset
from vlm.embedding import embed_images
from vlm.errors import ImageError, VlmError
from vlm.locks import only_writer
from vlm.progress import progress_bar
from vlm.schema import from_dict

log = logging.getLogger(__name__)
MANIFEST = "embeddings.json"
LOCK = ".writer.lock"  # held by the one process writing the folder (vlm/locks.py)


@dataclass
class EmbeddingsManifest:
    source: str  # absolute path of the folder, or of the folder holding the tar shards
    kind: str  # "folder" or "webdataset"
    model: str  # as given to load_clip
    model_fingerprint: str
    dim: int
    shard_size: int  # inputs per shard
    count: int  # inputs in all


@dataclass
class Item:
    path: str  # relative to the source: "a/b.jpg", or "00000.tar#key.jpg"
    mtime: float
    size: int
    image: object  # what load_image reads: a path or a webdataset.TarMember


@dataclass
class Listing:
    root: Path  # the folder, or the folder holding the tar shards
    kind: str  # "folder" or "webdataset"
    items: list[Item]  # in a stable order
    skipped: list[str]  # reasons, each naming a folder entry that cannot be read


@dataclass
class EmbedReport:
    embedded: int = 0  # inputs embedded by this run
    resumed_shards: int = 0  # shards already done by an earlier run
    shards: int = 0
    failed: list[str] = field(default_factory=list)  # reasons, each naming the file

    def summary(self) -> str:
        text = f"{self.embedded} embedded into {self.shards} shards ({self.resumed_shards} done before), {len(self.failed)} unreadable"
        return text + "".join(f"\n  unreadable: {reason}" for reason in self.failed)


def list_items(source: str | Path) -> Listing:
    """The images of a folder or of webdataset shards, and the folder's unreadable entries."""
    if webdataset.is_webdataset(source):
        shards = webdataset.shard_paths(source)
        root = shards[0].parent.resolve()
        items = []
        for member in webdataset.image_members(source):
            shard = Path(member.shard).resolve()
            items.append(
                Item(f"{shard.relative_to(root).as_posix()}#{member.name}", shard.stat().st_mtime, member.size, member)
            )
        return Listing(root, "webdataset", items, [])
    root = Path(source).resolve()
    if not root.is_dir():
        raise VlmError(f"{source}: not a folder of images or webdataset shards")
    scan = scan_folder(root)
    return Listing(
        root, "folder", [Item(f.path, f.mtime, f.size, str(root / f.path)) for f in scan.files], scan.skipped
    )


def _hash(item: Item) -> tuple[str | None, str | None]:
    """(sha256 of the item's bytes, None), or (None, why they cannot be read)."""
    if isinstance(item.image, webdataset.TarMember):
        try:
            return hashlib.sha256(item.image.read_bytes()).hexdigest(), None
        except OSError as e:
            return None, f"{item.image}: cannot read ({e.strerror or e})"
    try:
        return content_hash(Path(item.image)), None
    except ImageError as e:
        return None, str(e)


def _shard_name(number: int) -> str:
    return f"{number:05d}"


def embed_to_shards(
    source: str | Path,
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    shard_size: int = 10_000,
    batch_size: int = 256,
    workers: int = 2,
    engine: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
) -> EmbedReport:
    """Embed every image of `source` into shards in `out`, resuming an earlier run.

    Each input is hashed before it is embedded: one that vanished, became a FIFO or
    cannot be read is a failed input (a row with "error"), like an image that cannot be
    decoded. Folder entries that are not readable files are named in the report.

    Raises:
        VlmError: `shard_size` below 1, no images, `out` holds another source's or
            model's embeddings (or a damaged embeddings.json) or files that are not
            embeddings, or another process is writing it.
    """
    if shard_size < 1:
        raise VlmError(f"shard_size must be at least 1, got {shard_size}")
    listing = list_items(source)
    if not listing.items:
        raise VlmError(
            f"{source}: no images found" + (f" that can be read ({listing.skipped[0]})" if listing.skipped else "")
        )
    out, items = Path(out), listing.items
    before = (
        asdict(read_manifest(out)) if is_embeddings(out) else None
    )  # a damaged one is refused before the model loads
    clip = load_clip(model)
    manifest = EmbeddingsManifest(
        str(listing.root), listing.kind, model, clip.fingerprint, clip.embed_dim, shard_size, len(items)
    )
    if before is not None:
        if before != asdict(manifest):
            changed = ", ".join(k for k in before if before[k] != asdict(manifest)[k])
            raise VlmError(f"{out} holds other embeddings (different {changed}); use another --out")
    if before is None and out.is_dir() and any(entry.name != LOCK for entry in out.iterdir()):
        raise VlmError(f"{out} is not empty and not an embeddings folder; choose an empty or new --out")
    with only_writer(out / LOCK, busy=f"another vlmstack is writing {out}; wait for it to finish"):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / MANIFEST, asdict(manifest))
        report = EmbedReport(shards=-(-len(items) // shard_size), failed=list(listing.skipped))
        pending = [n for n in range(report.shards) if not (out / f"{_shard_name(n)}.npy").exists()]
        report.resumed_shards = report.shards - len(pending)
        chunks = [items[n * shard_size : (n + 1) * shard_size] for n in pending]
        to_hash = [item for chunk in chunks for item in chunk]
        hashed = iter(
            [
                _hash(item)
                for item in progress_bar(
                    to_hash, desc="hashing", unit="file", disable=not progress or len(to_hash) < 1000
                )
            ]
        )
        hashes = [[next(hashed) for _ in chunk] for chunk in chunks]  # per chunk: (sha256, error) per item
        readable = [[item for item, (_, error) in zip(chunk, h) if error is None] for chunk, h in zip(chunks, hashes)]
        if engine == "ray":
            from vlm import ray_engine

            images = [item.image for chunk in readable for item in chunk]
            results = ray_engine.embed_stream(
                model, images, batch_size=batch_size, workers=workers, address=ray_address, progress=False
            )
        elif engine == "local":
            results = _local_stream(clip, readable, batch_size=batch_size, workers=workers)
        else:
            raise VlmError(f"unknown engine {engine!r}; choose from local, ray")
        with progress_bar(
            total=len(items), initial=len(items) - len(to_hash), desc="embedding", unit="img", disable=not progress
        ) as bar:
            for number, chunk, chunk_hashes in zip(pending, chunks, hashes):
                rows, vectors = [], []
                for item, (digest, error) in zip(chunk, chunk_hashes):
                    row = {"path": item.path, "mtime": item.mtime, "size": item.size}
                    if error is None:  # readable items come out of `results` in order
                        _, vector, error = next(results)
                    if error:
                        row["error"] = error
                        report.failed.append(error)
                    else:
                        row["sha256"] = digest
                        vectors.append(vector)
                    rows.append(json.dumps(row, ensure_ascii=False))
                    bar.update(1)
                _write_shard(out, number, rows, np.asarray(vectors, np.float32).reshape(-1, clip.embed_dim))
                report.embedded += len(vectors)
        return report


def _local_stream(clip, chunks: list[list[Item]], *, batch_size: int, workers: int):
    """(position in chunk, vector or None, error or None) per item, chunk after chunk."""
    for chunk in chunks:
        embedded = embed_images(
            clip, [item.image for item in chunk], batch_size=batch_size, workers=workers, progress=False
        )
        vectors = dict(zip(embedded.indices, embedded.vectors.numpy()))
        errors = dict(embedded.failures)
        for i in range(len(chunk)):
            yield i, vectors.get(i), errors.get(i)


def _write_shard(out: Path, number: int, rows: list[str], vectors: np.ndarray) -> None:
    """The metadata, then the vectors: a shard is done once its .npy exists."""
    name = _shard_name(number)
    write_text(out / f"{name}.jsonl", "".join(line + "\n" for line in rows))
    with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, vectors)


def read_manifest(folder: str | Path) -> EmbeddingsManifest:
    """The embeddings folder's manifest, every field checked for type and range.

    Raises:
        VlmError: no manifest, or a damaged one (the message names the field).
    """
    path = Path(folder) / MANIFEST
    fix = "embed again into a new --out"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VlmError(f"{folder}: not a vlmstack embeddings folder ({e})") from None
    try:
        manifest = from_dict(EmbeddingsManifest, data, str(path))  # types, unknown and missing fields
    except VlmError as e:
        raise VlmError(f"{e}; {fix}") from None
    checks = [
        (manifest.kind in ("folder", "webdataset"), f"kind must be folder or webdataset, not {manifest.kind!r}"),
        (Path(manifest.source).is_absolute(), f"source must be an absolute path, not {manifest.source!r}"),
        (bool(manifest.model), "model must not be empty"),
        (manifest.dim >= 1, f"dim must be at least 1, not {manifest.dim}"),
        (manifest.shard_size >= 1, f"shard_size must be at least 1, not {manifest.shard_size}"),
        (manifest.count >= 0, f"count must not be negative, not {manifest.count}"),
    ]
    for ok, problem in checks:
        if not ok:
            raise VlmError(f"{path}: {problem}; {fix}")
    return manifest


def is_embeddings(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


@dataclass
class ShardRow:
    """One line of a shard's .jsonl."""

    path: str
    mtime: float
    size: int
    sha256: str = ""  # of a readable input
    error: str = ""  # why the input could not be read


def _read_rows(path: Path) -> list[ShardRow]:
    """Raises VlmError naming the line when the file is missing or a line is damaged."""
    fix = "embed again into a new --out"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise VlmError(f"{path}: cannot read ({e}); {fix}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            data = json.loads(line)
        except ValueError:
            raise VlmError(f"{path}: line {number} is not JSON; {fix}") from None
        try:
            row = from_dict(ShardRow, data, f"{path} line {number}")
        except VlmError as e:
            raise VlmError(f"{e}; {fix}") from None
        if not row.sha256 and not row.error:
            raise VlmError(f"{path} line {number}: neither sha256 nor error; {fix}")
        rows.append(row)
    return rows


def _read_vectors(path: Path, count: int, dim: int) -> np.ndarray:
    """A shard's (count, dim) float32 vectors, memory-mapped. Raises VlmError if damaged."""
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise VlmError(f"{path}: damaged shard ({e}); embed again into a new --out") from None
    if vectors.dtype != np.float32 or vectors.shape != (count, dim):
        raise VlmError(
            f"{path}: holds {vectors.shape} {vectors.dtype}, its .jsonl says ({count}, {dim}) float32; embed again into a new --out"
        )
    return vectors


def build_index_from_shards(
    folder: str | Path,
    out: str | Path,
    *,
    spec: str = "auto",
    max_memory: int = 0,
    backend: str = "faiss",
    milvus_uri: str = "",
    progress: bool = True,
) -> IndexReport:
    """An index (as `index build` makes) from the shards of `vlmstack embed`.

    Byte-identical inputs share one vector; unreadable ones are left out. The distinct
    vectors stream from the memory-mapped shards into the index's vectors.npy, and the
    index is trained on a sample and filled a chunk at a time from that file, so RAM never
    holds every vector at once: peak RAM is about the FAISS structure plus its training
    sample. `max_memory`, `backend` and `milvus_uri` as for retrieval.build_index: with
    milvus, the shards' vectors are bulk-loaded into a new collection, INSERT_ROWS at a
    time, in the same streamed pass.

    Raises:
        VlmError: the embeddings are unfinished or damaged; `out` already holds an index,
            holds files of the user's, or is being written by another process.
    """
    started = time.perf_counter()
    folder, out = Path(folder), Path(out)
    emb = read_manifest(folder)
    shards = -(-emb.count // emb.shard_size)
    missing = [n for n in range(shards) if not (folder / f"{_shard_name(n)}.npy").exists()]
    if missing:
        raise VlmError(
            f"{folder}: {len(missing)} of {shards} shards unfinished; run `vlmstack embed` again to finish them"
        )
    index_spec.check_spec(spec, emb.dim)
    store.check_new_index(out)
    milvus_uri = check_backend(backend, milvus_uri, spec)
    with store.new_index(out):
        # First pass, metadata only: which rows are distinct contents.
        hashes, files, content_id, picks, readable, report = [], [], {}, [], [], IndexReport()
        for number in progress_bar(range(shards), desc="reading shards", unit="shard", disable=not progress):
            row_in_shard = 0
            for row in _read_rows(folder / f"{_shard_name(number)}.jsonl"):
                if row.error:
                    report.failed.append(row.error)
                    continue
                if row.sha256 not in content_id:
                    content_id[row.sha256] = len(hashes)
                    hashes.append(row.sha256)
                    picks.append((number, row_in_shard))
                files.append((row.path, row.mtime, row.size, content_id[row.sha256]))
                row_in_shard += 1
            readable.append(row_in_shard)
        # Second pass: stream the chosen vectors out of the memory-mapped shards, in order.
        vectors = _stream_vectors(folder, out / store.VECTORS_TMP, picks, readable, emb.dim)
        if not hashes:
            raise VlmError(f"{folder}: no readable images were embedded")

        manifest = store.Manifest(
            root=emb.source,
            model=emb.model,
            model_fingerprint=emb.model_fingerprint,
            dim=emb.dim,
            index_spec=spec,
            max_memory=max_memory,
            source=emb.kind,
            backend=backend,
            milvus_uri=milvus_uri,
        )
        index, tuning = search_index(out, manifest, vectors)
        built, report.shortfall = manifest.built_spec, tuning.shortfall or ""
        files.sort()
        store.save(out, manifest, store.IndexData(vectors, hashes, files), index)
    report.added, report.count, report.files, report.index_spec = len(files), len(hashes), len(files), built
    report.duplicates = len(files) - len(hashes)
    report.seconds = time.perf_counter() - started
    return report


def _stream_vectors(folder: Path, path: Path, picks: list[tuple[int, int]], readable: list[int], dim: int):
    """Write the (shard, row) `picks` in order into the .npy at `path`, one shard at a
    time, and return it memory-mapped. `picks` run through the shards in order."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False,
                "shape": (len(picks), dim),
            },
        )
        start = 0
        while start < len(picks):
            number = picks[start][0]
            stop = start
            while stop < len(picks) and picks[stop][0] == number:
                stop += 1
            shard = _read_vectors(folder / f"{_shard_name(number)}.npy", readable[number], dim)
            rows = [row for _, row in picks[start:stop]]
            for at in range(0, len(rows), index_spec.CHUNK):
                np.ascontiguousarray(shard[rows[at : at + index_spec.CHUNK]], np.float32).tofile(f)
            del shard
            start = stop
    return np.load(path, mmap_mode="r")
