"""Which FAISS index to build, how hard it searches, and how it re-ranks.

Chosen by size and a memory budget (`--max-memory`, default half the machine's RAM) —
the budget is what the FAISS structure may take in RAM when it is searched:

    count <= 50,000                      Flat            exact
    count x dim x 4 B fits the budget    IVF{n},Flat     float vectors in the lists
    count x dim x 1 B fits the budget    IVF{n},SQ8      8-bit scalar codes, re-ranked
    otherwise                            OPQ{m},IVF{n},PQ{m}   64-byte codes at 512-d, re-ranked

A lossy index (SQ, PQ) is searched for k x `k_factor` candidates, which are re-scored
exactly against the float vectors the index keeps on disk (vectors.npy, memory-mapped:
page cache, not the budget) — `Refined`. Vectors are L2-normalised, so inner product =
cosine similarity.

After an approximate index is built, its search breadth (IVF `nprobe`, HNSW `efSearch`,
and `k_factor` for a refined one) is tuned on a sample of the indexed vectors: the
smallest setting whose recall@10 against exact search reaches `target_recall`. When no
setting reaches it, `Tuning.shortfall` says so in one line with the figure reached.
"""

import logging
import math
import os
import re
from dataclasses import dataclass

import faiss
import numpy as np

from vlm.errors import VlmError

log = logging.getLogger(__name__)

FLAT_MAX = 50_000  # exact search over 50k x 512 floats takes ~2 ms per query on 2 cores
IVF_FLAT_MAX = 5_000_000  # above this an IVF-Flat search scans too many floats per query (capacity.md)
SEARCH_PARAMETERS = ("nprobe", "efSearch", "k_factor")  # the search breadths tune_search sets
MAX_SEARCH_BREADTH = 1 << 20  # above any nlist auto_spec picks, and any efSearch worth its time
MAX_K_FACTOR = 64  # re-rank at most 64 x k candidates: 640 random 2 KiB reads for k = 10
LOSSY_CODES = re.compile(r"(?:^|,)(?:PQ|SQ|LSH|RQ|LSQ|PRQ|PLSQ)")  # index_factory codes that lose precision
CHUNK = 100_000  # vectors read, added or scanned at a time


def default_max_memory() -> int:
    """Half the machine's RAM, in bytes: the other half is for the build's working set,
    the page cache of vectors.npy, and everything else the machine runs."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def auto_spec(count: int, dim: int, *, max_memory: int | None = None) -> str:
    """An index_factory string for `count` vectors of `dim` dimensions whose codes fit
    `max_memory` bytes (default: default_max_memory())."""
    if count <= FLAT_MAX:
        return "Flat"
    budget = default_max_memory() if max_memory is None else max_memory
    # ~4 sqrt(N) lists, a power of two, so each list holds ~sqrt(N)/4 vectors.
    nlist = 2 ** round(math.log2(4 * math.sqrt(count)))
    if count <= IVF_FLAT_MAX and count * dim * 4 <= budget:
        return f"IVF{nlist},Flat"
    if count * dim <= budget:
        return f"IVF{nlist},SQ8"
    m = _pq_size(dim)
    return f"OPQ{m},IVF{nlist},PQ{m}"


def is_lossy(spec: str) -> bool:
    """Whether `spec` stores compressed codes (its search is then re-ranked by `Refined`)."""
    return LOSSY_CODES.search(spec) is not None


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


def chunks(vectors: np.ndarray, size: int = CHUNK):
    """(start, rows) over `vectors` `size` rows at a time, each a copy in RAM. A memory
    map (vectors.npy) is read with plain file reads, so what was read goes to the page
    cache and not into this process's resident set."""
    path = getattr(vectors, "filename", None)
    for start in range(0, len(vectors), size):
        stop = min(start + size, len(vectors))
        if path is None or not vectors.flags.c_contiguous:
            yield start, np.ascontiguousarray(vectors[start:stop], np.float32)
            continue
        row_bytes = vectors.shape[1] * vectors.itemsize
        rows = np.fromfile(
            path, vectors.dtype, (stop - start) * vectors.shape[1], offset=vectors.offset + start * row_bytes
        )
        yield start, rows.reshape(stop - start, vectors.shape[1]).astype(np.float32, copy=False)


def build_faiss(vectors: np.ndarray, spec: str, *, seed: int = 0) -> faiss.Index:
    """Train (if needed) and fill an inner-product index with `vectors` (N, D) float32,
    which may be a memory map: it is read a chunk at a time, never whole.

    Raises:
        VlmError: `spec` is not buildable, or an IVF index has more lists than vectors.
    """
    count, dim = vectors.shape
    index = _factory(spec, dim)
    if not index.is_trained:
        _skip_polysemous_training(index)
        rng = np.random.default_rng(seed)
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in spec else 0
        if "IVF" in spec and count < nlist:
            raise VlmError(
                f"--index-spec {spec}: {nlist} lists need at least {nlist} distinct images to train, there are {count}; use auto"
            )
        # ~40 training vectors per centroid: IVF lists, and PQ's 256 codes per sub-quantiser.
        picked = np.sort(rng.choice(count, size=min(count, max(nlist, 256) * 40), replace=False)) if count else []
        sample = np.ascontiguousarray(vectors[picked], np.float32)
        log.info("training %s on %d vectors", spec, len(sample))
        index.train(sample)
        del sample
    for _, rows in chunks(vectors):
        index.add(rows)
    return index


def _skip_polysemous_training(index: faiss.Index) -> None:
    """FAISS trains PQ codes for polysemous (Hamming) filtering by default, which we never
    search with and which costs 10x the PQ training itself."""
    try:
        inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def build(vectors: np.ndarray, spec: str):
    """build_faiss, wrapped in `Refined` over `vectors` when `spec` is lossy."""
    index = build_faiss(vectors, spec)
    return Refined(base=index, vectors=vectors) if is_lossy(spec) else index


class Refined:
    """A lossy FAISS index whose top k x `k_factor` candidates are re-scored exactly
    against the float `vectors` (N, D), usually memory-mapped from vectors.npy.
    Searched like a FAISS index: `search(queries, k) -> (scores, ids)`."""

    def __init__(self, *, base: faiss.Index, vectors: np.ndarray, k_factor: int = 16):
        self.base, self.vectors, self.k_factor = base, vectors, k_factor

    @property
    def ntotal(self) -> int:
        return self.base.ntotal

    @property
    def d(self) -> int:
        return self.base.d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        candidates = self.base.search(queries, min(k * self.k_factor, self.ntotal))[1]  # (Q, k * k_factor)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = np.unique(found[found >= 0])  # sorted: memory-map reads in file order
            exact = self.vectors[found] @ query  # (candidates,)
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, : len(best)], ids[row, : len(best)] = exact[best], found[best]
        return scores, ids


@dataclass
class Tuning:
    params: dict  # search breadths to store in the manifest, e.g. {"nprobe": 16, "k_factor": 8}
    recall: float  # recall@k on the sample at those breadths (1.0 for exact indexes)
    target: float  # the recall@k that was asked for
    k: int = 10  # results per query the recall counts

    @property
    def shortfall(self) -> str | None:
        """One line when the target was not reached, else None."""
        if self.recall >= self.target:
            return None
        shown = ", ".join(f"{name}={value}" for name, value in self.params.items())
        return (
            f"search tuning stopped at recall@{self.k} {self.recall:.3f} (target {self.target:.2f}) with {shown}, the widest "
            "search there is; results will miss true neighbours: choose a finer --index-spec or a larger --max-memory"
        )


def tune_search(
    index,
    vectors: np.ndarray,
    *,
    target_recall: float = 0.97,
    queries: int = 500,
    k: int = 10,
    seed: int = 0,
) -> Tuning:
    """The smallest search breadth reaching `target_recall` against exact search.

    `index` is a FAISS index or a `Refined` one (then `k_factor` is tuned too: the
    breadth is first found at MAX_K_FACTOR, then the re-ranked candidates are cut while
    the recall holds). A Tuning with a `shortfall` when no breadth reaches the target.
    """
    base = index.base if isinstance(index, Refined) else index
    name = _breadth_parameter(base)
    if (name is None and not isinstance(index, Refined)) or len(vectors) <= k:
        return Tuning({}, 1.0, target_recall, k)
    # Leave-one-out: each sample vector queries the index with itself excluded, so the
    # tuning reflects new queries near the data, not the trivial self-match.
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False))
    sample = np.ascontiguousarray(vectors[picked], np.float32)
    truth = _without_self(exact_neighbours(sample, vectors, k + 1), picked, k)

    def recall_at(params: dict) -> float:
        apply_search_params(index, params)
        found = _without_self(index.search(sample, k + 1)[1], picked, k)
        return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))

    refine = {"k_factor": MAX_K_FACTOR} if isinstance(index, Refined) else {}
    params, recall = dict(refine), 0.0
    if name is not None:
        limit = _breadth_limit(base, name)
        value = 1
        while True:
            params = {name: value, **refine}
            recall = recall_at(params)
            if recall >= target_recall or value >= limit:
                break
            value *= 2
    else:
        recall = recall_at(params)
    while refine and recall >= target_recall and params["k_factor"] > 1:  # fewer candidates while recall holds
        fewer = {**params, "k_factor": params["k_factor"] // 2}
        fewer_recall = recall_at(fewer)
        if fewer_recall < target_recall:
            break
        params, recall = fewer, fewer_recall
    apply_search_params(index, params)
    tuning = Tuning(params, recall, target_recall, k)
    log.info("tuned %s: recall@%d %.3f on %d sample queries", params, k, recall, len(sample))
    if tuning.shortfall:
        log.warning(tuning.shortfall)
    return tuning


def _without_self(ids: np.ndarray, selves: np.ndarray, k: int) -> list[list[int]]:
    return [[i for i in row if i != self][:k] for row, self in zip(ids.tolist(), selves.tolist())]


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int, *, chunk: int = 250_000) -> np.ndarray:
    """(Q, k) ids of the true top-k by inner product, reading `vectors` (may be a memory
    map) a chunk at a time instead of copying it into an index."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    for start, rows in chunks(vectors, chunk):
        scores, ids = faiss.knn(queries, rows, min(k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return best_ids


def apply_search_params(index, params: dict) -> None:
    """Set search breadths ({"nprobe": 16}, and "k_factor" on a `Refined` index).

    Raises:
        VlmError: a parameter that this kind of index does not have.
    """
    base = index.base if isinstance(index, Refined) else index
    if not isinstance(base, faiss.Index):  # another engine (milvus.MilvusIndex) sets its own
        for name, value in params.items():
            base.set_search_param(name, value)
        return
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            if name != "k_factor":
                space.set_index_parameter(base, name, value)
            elif isinstance(index, Refined):
                index.k_factor = value
            else:
                raise RuntimeError("only a refined index re-ranks")
        except RuntimeError:
            raise VlmError(
                f"search parameter {name} does not apply to an index of type {type(index).__name__}; rebuild the index with `vlmstack index build`"
            ) from None


def _breadth_parameter(index) -> str | None:
    if not isinstance(index, faiss.Index):
        return index.breadth_parameter
    try:
        faiss.extract_index_ivf(index)
        return "nprobe"
    except RuntimeError:
        pass
    return "efSearch" if "HNSW" in type(index).__name__ else None


def _breadth_limit(index, name: str) -> int:
    if not isinstance(index, faiss.Index):
        return index.breadth_limit
    return faiss.extract_index_ivf(index).nlist if name == "nprobe" else 4096
