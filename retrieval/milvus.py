"""Milvus as an index's vector store, for collections that outgrow one machine.

    vlmstack index build ~/Pictures --out pics.index --backend milvus --milvus-uri http://host:19530
    vlmstack index build ~/Pictures --out pics.index --backend milvus --milvus-uri ./pics.db  # Milvus Lite

The index directory stays the handle that search, update, the app and the server open:
its manifest names the backend, the URI and the current collection; its version folder
holds meta.sqlite and vectors.npy as for FAISS (paths and hashes; the vectors an update
re-uses). The vectors and their ANN index live in the collection: `id` (INT64, the
content id the metadata store maps to paths) and `vector` (FLOAT_VECTOR, inner product).
Its properties record the model and weights fingerprint it was embedded with, and mark
it complete once every vector is in.

Every save loads a new collection `{prefix}_{token}`, checks that it holds every vector,
and only then switches the manifest to it (the commit point, as for FAISS); the older
collections of the same prefix are dropped after. An interrupted build or update leaves a
collection no manifest names, which is never searched and is dropped by the next save.
"""

import logging
import re
import secrets
import zlib
from pathlib import Path

import numpy as np

from vlm.errors import VlmError

log = logging.getLogger(__name__)

FLAT_MAX = 50_000  # below this a collection is searched exactly (FLAT)
NLIST = 1024  # IVF lists per segment: ~4 sqrt(rows) for Milvus's 64k-1M-row segments
INSERT_ROWS = 20_000  # rows per insert call (a gRPC message stays well under 64 MB at 512-d)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")


def connect(uri: str):
    """A MilvusClient for `uri`: http(s)://host:port (Milvus standalone/cluster, Zilliz) or a
    local file ending in .db (Milvus Lite, embedded).

    Raises:
        VlmError: pymilvus is not installed, or Milvus cannot be reached (one line).
    """
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise VlmError(
            "the milvus backend needs pymilvus (and milvus-lite for a .db file): pip install 'vlmstack[milvus]'"
        ) from None
    if "://" not in uri and not uri.endswith(".db"):
        raise VlmError(f"--milvus-uri {uri!r}: give http://HOST:PORT, or a Milvus Lite file ending in .db")
    if "://" not in uri:
        # Milvus Lite serves pymilvus in-process; pymilvus calls AllocTimestamp, which Lite
        # does not implement, and grpc logs a traceback for it (the call's failure is harmless).
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    try:
        client = MilvusClient(uri=uri, timeout=10)
        client.list_collections()
    except Exception as e:  # pymilvus raises MilvusException, grpc errors, OSError for a Lite file
        reason = str(getattr(e, "message", "") or e).splitlines()[0][:200]
        raise VlmError(f"cannot reach Milvus at {uri} ({reason}); start it or check --milvus-uri") from None
    return client


def resolve_uri(uri: str) -> str:
    """A Milvus Lite file as an absolute path (the index may be opened from elsewhere)."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def collection_prefix(index_dir: Path) -> str:
    """A collection name prefix unique to the index directory's absolute path."""
    path = str(Path(index_dir).resolve())
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).name)[:60]
    return f"vlmstack_{stem}_{zlib.crc32(path.encode()):08x}"


class MilvusIndex:
    """One collection, searched like a FAISS index: `search(queries, k) -> (scores, ids)`."""

    def __init__(self, *, client, collection: str, dim: int, count: int, index_type: str):
        self.client, self.collection, self.d, self.ntotal = client, collection, dim, count
        self.index_type = index_type
        self.nprobe = 16
        # What spec.tune_search tunes, and how far.
        self.breadth_parameter = "nprobe" if index_type == "IVF_FLAT" else None
        self.breadth_limit = NLIST

    def set_search_param(self, name: str, value: int) -> None:
        if name != self.breadth_parameter:
            raise VlmError(f"search parameter {name} does not apply to a Milvus {self.index_type} collection")
        self.nprobe = value

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        params = {"metric_type": "IP", "params": {"nprobe": self.nprobe} if self.breadth_parameter else {}}
        try:
            found = self.client.search(
                self.collection, data=queries.tolist(), limit=k, search_params=params, output_fields=[]
            )
        except Exception as e:
            raise VlmError(f"Milvus search in {self.collection} failed ({str(e).splitlines()[0][:200]})") from None
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for row, hits in enumerate(found):
            for rank, hit in enumerate(hits[:k]):
                scores[row, rank], ids[row, rank] = hit["distance"], hit["id"]
        return scores, ids

    def drop_others(self) -> None:
        """Drop the collections of this index other than this one: older versions and
        what interrupted saves left."""
        prefix = self.collection.rsplit("_", 1)[0]
        for name in self.client.list_collections():
            if name != self.collection and name.rsplit("_", 1)[0] == prefix:
                log.info("dropping Milvus collection %s", name)
                self.client.drop_collection(name)


def write_collection(
    uri: str, prefix: str, vectors: np.ndarray, *, model: str, fingerprint: str, chunk: int = INSERT_ROWS
) -> MilvusIndex:
    """Load `vectors` (N, D) (may be a memory map) into a new collection `{prefix}_{token}`,
    index it, and check that it holds all N before returning it.

    Raises:
        VlmError: Milvus cannot be reached, or the collection does not hold every vector.
    """
    from pymilvus import DataType

    client = connect(uri)
    name = f"{prefix}_{secrets.token_hex(6)}"
    count, dim = vectors.shape
    index_type = "FLAT" if count <= FLAT_MAX else "IVF_FLAT"
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index_params = client.prepare_index_params()
    index_params.add_index(
        field_name="vector",
        index_type=index_type,
        metric_type="IP",
        params={"nlist": NLIST} if count > FLAT_MAX else {},
    )
    properties = {"vlmstack.model": model, "vlmstack.fingerprint": fingerprint}
    client.create_collection(name, schema=schema, index_params=index_params, properties=properties)
    log.info("loading %d vectors into Milvus collection %s (%s)", count, name, index_type)
    for start in range(0, count, chunk):
        rows = np.ascontiguousarray(vectors[start : start + chunk], np.float32)
        client.insert(name, [{"id": start + i, "vector": row} for i, row in enumerate(rows.tolist())])
    client.flush(name)
    client.load_collection(name)
    stored = int(client.get_collection_stats(name)["row_count"])
    if stored != count:
        client.drop_collection(name)
        raise VlmError(f"Milvus collection {name} holds {stored} of {count} vectors after loading; build again")
    client.alter_collection_properties(name, properties={"vlmstack.complete": "true"})
    return MilvusIndex(client=client, collection=name, dim=dim, count=count, index_type=index_type)


def open_collection(uri: str, collection: str, *, dim: int, count: int, fingerprint: str, where: str) -> MilvusIndex:
    """The collection an index's manifest names, checked against it.

    Raises:
        VlmError: unreachable, missing, embedded with other weights, or not holding
            `count` vectors of `dim`.
    """
    client = connect(uri)
    fix = "rebuild the index with `vlmstack index build`"
    if not client.has_collection(collection):
        raise VlmError(f"{where}: Milvus collection {collection} is missing from {uri}; {fix}")
    info = client.describe_collection(collection)
    made_with = info.get("properties") or {}
    if made_with.get("vlmstack.fingerprint") != fingerprint:
        raise VlmError(
            f"{where}: Milvus collection {collection} was embedded with {made_with.get('vlmstack.model', 'an unknown model')} "
            f"(weights {made_with.get('vlmstack.fingerprint', '?')}), the index says weights {fingerprint}; {fix}"
        )
    vector = next((f for f in info["fields"] if f["name"] == "vector"), None)
    stored = int(client.get_collection_stats(collection)["row_count"])
    complete = made_with.get("vlmstack.complete") == "true"
    if vector is None or int(vector["params"]["dim"]) != dim or stored != count or not complete:
        raise VlmError(
            f"{where}: Milvus collection {collection} holds {stored} vectors{'' if complete else ', not marked complete'}, "
            f"the manifest says {count} x {dim}; {fix}"
        )
    index_type = "FLAT" if count <= FLAT_MAX else "IVF_FLAT"
    client.load_collection(collection)
    return MilvusIndex(client=client, collection=collection, dim=dim, count=count, index_type=index_type)
