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
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from retrieval import spec as index_spec
from retrieval import store
from retrieval.index import DEFAULT_MODEL, IndexReport
from retrieval.scan import scan_folder
from vlm.atomic import atomic_path, write_json, write_text
from vlm.clip import load_clip
from vlm.data import webdataset
from vlm.embedding import embed_images
from vlm.errors import VlmError
from vlm.hashing import sha256_file
from vlm.progress import progress_bar

log = logging.getLogger(__name__)
MANIFEST = "embeddings.json"


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
class EmbedReport:
    embedded: int = 0  # inputs embedded by this run
    resumed_shards: int = 0  # shards already done by an earlier run
    shards: int = 0
    failed: list[str] = field(default_factory=list)  # reasons, each naming the file

    def summary(self) -> str:
        text = f"{self.embedded} embedded into {self.shards} shards ({self.resumed_shards} done before), {len(self.failed)} unreadable"
        return text + "".join(f"\n  unreadable: {reason}" for reason in self.failed)


def list_items(source: str | Path) -> tuple[Path, str, list[Item]]:
    """(root, kind, items) of a folder of images or webdataset shards, in a stable order."""
    if webdataset.is_webdataset(source):
        shards = webdataset.shard_paths(source)
        root = shards[0].parent.resolve()
        items = []
        for member in webdataset.image_members(source):
            shard = Path(member.shard).resolve()
            items.append(Item(f"{shard.relative_to(root).as_posix()}#{member.name}", shard.stat().st_mtime, member.size, member))
        return root, "webdataset", items
    root = Path(source).resolve()
    if not root.is_dir():
        raise VlmError(f"{source}: not a folder of images or webdataset shards")
    return root, "folder", [Item(f.path, f.mtime, f.size, str(root / f.path)) for f in scan_folder(root)]


def _sha256(item: Item) -> str:
    if isinstance(item.image, webdataset.TarMember):
        return hashlib.sha256(item.image.read_bytes()).hexdigest()
    return sha256_file(Path(item.image))


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

    Raises:
        VlmError: no images, or `out` holds another source's or model's embeddings.
    """
    root, kind, items = list_items(source)
    if not items:
        raise VlmError(f"{source}: no images found")
    out = Path(out)
    clip = load_clip(model)
    manifest = EmbeddingsManifest(str(root), kind, model, clip.fingerprint, clip.embed_dim, shard_size, len(items))
    if (out / MANIFEST).exists():
        before = json.loads((out / MANIFEST).read_text())
        if before != asdict(manifest):
            changed = ", ".join(k for k in before if before[k] != asdict(manifest).get(k))
            raise VlmError(f"{out} holds other embeddings (different {changed}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, asdict(manifest))
    report = EmbedReport(shards=-(-len(items) // shard_size))
    pending = [n for n in range(report.shards) if not (out / f"{_shard_name(n)}.npy").exists()]
    report.resumed_shards = report.shards - len(pending)
    chunks = [items[n * shard_size : (n + 1) * shard_size] for n in pending]
    if engine == "ray":
        from vlm import ray_engine

        images = [item.image for chunk in chunks for item in chunk]
        results = ray_engine.embed_stream(model, images, batch_size=batch_size, workers=workers, address=ray_address, progress=False)
    elif engine == "local":
        results = _local_stream(clip, chunks, batch_size=batch_size, workers=workers)
    else:
        raise VlmError(f"unknown engine {engine!r}; choose from local, ray")
    with progress_bar(total=len(items), initial=len(items) - sum(map(len, chunks)), desc="embedding", unit="img", disable=not progress) as bar:
        for number, chunk in zip(pending, chunks):
            rows, vectors = [], []
            for item, (_, vector, error) in zip(chunk, itertools.islice(results, len(chunk))):
                row = {"path": item.path, "mtime": item.mtime, "size": item.size}
                if error:
                    row["error"] = error
                    report.failed.append(error)
                else:
                    row["sha256"] = _sha256(item)
                    vectors.append(vector)
                rows.append(json.dumps(row, ensure_ascii=False))
                bar.update(1)
            _write_shard(out, number, rows, np.asarray(vectors, np.float32).reshape(-1, clip.embed_dim))
            report.embedded += len(vectors)
    return report


def _local_stream(clip, chunks: list[list[Item]], *, batch_size: int, workers: int):
    """(position in chunk, vector or None, error or None) per item, chunk after chunk."""
    for chunk in chunks:
        embedded = embed_images(clip, [item.image for item in chunk], batch_size=batch_size, workers=workers, progress=False)
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
    try:
        return EmbeddingsManifest(**json.loads((Path(folder) / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise VlmError(f"{folder}: not a vlmstack embeddings folder ({e})") from None


def is_embeddings(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def build_index_from_shards(folder: str | Path, out: str | Path, *, spec: str = "auto", progress: bool = True) -> IndexReport:
    """An index (as `index build` makes) from the shards of `vlmstack embed`.

    Byte-identical inputs share one vector; unreadable ones are left out.

    Raises:
        VlmError: the embeddings are unfinished, or `out` already holds an index.
    """
    started = time.perf_counter()
    folder, out = Path(folder), Path(out)
    emb = read_manifest(folder)
    shards = -(-emb.count // emb.shard_size)
    missing = [n for n in range(shards) if not (folder / f"{_shard_name(n)}.npy").exists()]
    if missing:
        raise VlmError(f"{folder}: {len(missing)} of {shards} shards unfinished; run `vlmstack embed` again to finish them")
    if (out / store.MANIFEST).exists():
        raise VlmError(f"{out} already holds an index; choose another --out")
    index_spec.check_spec(spec, emb.dim)

    # First pass, metadata only: which rows are distinct contents.
    hashes, files, content_id, picks, report = [], [], {}, [], IndexReport()
    for number in progress_bar(range(shards), desc="reading shards", unit="shard", disable=not progress):
        row_in_shard = 0
        for line in (folder / f"{_shard_name(number)}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "error" in row:
                report.failed.append((row["path"], row["error"]))
                continue
            digest = row["sha256"]
            if digest not in content_id:
                content_id[digest] = len(hashes)
                hashes.append(digest)
                picks.append((number, row_in_shard))
            files.append((row["path"], row["mtime"], row["size"], content_id[digest]))
            row_in_shard += 1
    # Second pass: copy the chosen vectors out of the memory-mapped shards.
    vectors = np.empty((len(hashes), emb.dim), np.float32)
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for target, (number, row) in enumerate(picks):
        by_shard.setdefault(number, []).append((target, row))
    for number, pairs in by_shard.items():
        shard = np.load(folder / f"{_shard_name(number)}.npy", mmap_mode="r")
        targets, rows = zip(*pairs)
        vectors[list(targets)] = shard[list(rows)]
    if not hashes:
        raise VlmError(f"{folder}: no readable images were embedded")

    built = index_spec.auto_spec(len(hashes), emb.dim) if spec == "auto" else spec
    manifest = store.Manifest(
        root=emb.source, model=emb.model, model_fingerprint=emb.model_fingerprint, dim=emb.dim,
        index_spec=spec, built_spec=built, source=emb.kind,
    )
    index = index_spec.build_faiss(vectors, built)
    manifest.search_params = index_spec.tune_search(index, vectors)
    files.sort()
    store.save(out, manifest, store.IndexData(vectors, hashes, files), index)
    report.added, report.count, report.files, report.index_spec = len(files), len(hashes), len(files), built
    report.duplicates = len(files) - len(hashes)
    report.seconds = time.perf_counter() - started
    return report
