"""Which FAISS index to build, and how hard it searches.

Chosen by size the way autofaiss does: exact search while it is fast enough, an inverted
file (IVF) above that, product quantisation (IVF-PQ) once the raw vectors would not fit
in memory. Vectors are L2-normalised, so inner product = cosine similarity.

After an approximate index is built, its search breadth (IVF `nprobe`, HNSW `efSearch`)
is tuned on a sample of the indexed vectors: the smallest setting whose recall@10
against exact search reaches `target_recall`.
"""

import logging
import math

import faiss
import numpy as np

from vlm.errors import VlmError

log = logging.getLogger(__name__)

FLAT_MAX = 50_000  # exact search over 50k x 512 floats takes ~2 ms per query on 2 cores
IVF_FLAT_MAX = 5_000_000  # 5M x 512 float32 = 10 GB: above this, compress with PQ
SEARCH_PARAMETERS = ("nprobe", "efSearch")  # the search breadths tune_search sets
MAX_SEARCH_BREADTH = 1 << 20  # above any nlist auto_spec picks, and any efSearch worth its time


def auto_spec(count: int, dim: int) -> str:
    """An index_factory string for `count` vectors of `dim` dimensions."""
    if count <= FLAT_MAX:
        return "Flat"
    # ~4 sqrt(N) lists, a power of two, so each list holds ~sqrt(N)/4 vectors.
    nlist = 2 ** round(math.log2(4 * math.sqrt(count)))
    if count <= IVF_FLAT_MAX:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ{_pq_size(dim)}"


def _pq_size(dim: int) -> int:
    """Sub-quantisers for PQ: ~8 dimensions each, and a divisor of dim."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def check_spec(spec: str, dim: int) -> None:
    """Raises VlmError unless `spec` is "auto" or an index_factory string FAISS can build."""
    if spec != "auto":
        _factory(spec, dim)


def _factory(spec: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise VlmError(
            f"--index-spec {spec!r}: not a FAISS index_factory string for {dim}-d vectors (e.g. Flat, IVF1024,Flat, HNSW32; or auto)"
        ) from None


def build_faiss(vectors: np.ndarray, spec: str, *, seed: int = 0) -> faiss.Index:
    """Train (if needed) and fill an inner-product index with `vectors` (N, D) float32.

    Raises:
        VlmError: `spec` is not buildable, or an IVF index has more lists than vectors.
    """
    count, dim = vectors.shape
    index = _factory(spec, dim)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in spec else 256
        if "IVF" in spec and count < nlist:
            raise VlmError(
                f"--index-spec {spec}: {nlist} lists need at least {nlist} distinct images to train, there are {count}; use auto"
            )
        sample = vectors[rng.choice(count, size=min(count, nlist * 40), replace=False)] if count else vectors
        log.info("training %s on %d vectors", spec, len(sample))
        index.train(np.ascontiguousarray(sample))
    for start in range(0, count, 100_000):
        index.add(np.ascontiguousarray(vectors[start : start + 100_000]))
    return index


def tune_search(
    index: faiss.Index,
    vectors: np.ndarray,
    *,
    target_recall: float = 0.97,
    queries: int = 500,
    k: int = 10,
    seed: int = 0,
) -> dict:
    """The smallest search breadth reaching `target_recall`; {} for exact indexes."""
    name = _breadth_parameter(index)
    if name is None or len(vectors) <= k:
        return {}
    # Leave-one-out: each sample vector queries the index with itself excluded, so the
    # tuning reflects new queries near the data, not the trivial self-match.
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)
    sample = np.ascontiguousarray(vectors[picked])
    truth = _without_self(exact_neighbours(sample, vectors, k + 1), picked, k)
    limit = faiss.extract_index_ivf(index).nlist if name == "nprobe" else 4096
    params = faiss.ParameterSpace()
    value, recall = 1, 0.0
    while True:
        params.set_index_parameter(index, name, value)
        found = _without_self(index.search(sample, k + 1)[1], picked, k)
        recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])
        if recall >= target_recall or value >= limit:
            break
        value *= 2
    log.info("tuned %s=%d: recall@%d %.3f on %d sample queries", name, value, k, recall, len(sample))
    return {name: value}


def _without_self(ids: np.ndarray, selves: np.ndarray, k: int) -> list[list[int]]:
    return [[i for i in row if i != self][:k] for row, self in zip(ids.tolist(), selves.tolist())]


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int, *, chunk: int = 250_000) -> np.ndarray:
    """(Q, k) ids of the true top-k by inner product, reading `vectors` (may be a memory
    map) a chunk at a time instead of copying it into an index."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(vectors), chunk):
        scores, ids = faiss.knn(
            queries, np.ascontiguousarray(vectors[start : start + chunk]), k, metric=faiss.METRIC_INNER_PRODUCT
        )
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return best_ids


def apply_search_params(index: faiss.Index, params: dict) -> None:
    """Set search breadths ({"nprobe": 16}) on `index`.

    Raises:
        VlmError: a parameter that this kind of index does not have.
    """
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            raise VlmError(
                f"search parameter {name} does not apply to an index of type {type(index).__name__}; rebuild the index with `vlmstack index build`"
            ) from None


def _breadth_parameter(index: faiss.Index) -> str | None:
    try:
        faiss.extract_index_ivf(index)
        return "nprobe"
    except RuntimeError:
        pass
    return "efSearch" if "HNSW" in type(index).__name__ else None
