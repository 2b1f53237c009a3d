"""Search an index by text, by example image, or both.

    searcher = Searcher.open("pictures.index")
    searcher.search_text("red circle - triangle", k=10)   # -> [Hit(rank, score, path)]
    searcher.search_image("example.jpg", k=10)

The model is the one the index was built with; passing another (`model=`) is an error
naming both. Scores are cosine similarities; paths are absolute and always inside the
indexed folder. `searcher.thumbnail(hit.path)` gives a cached JPEG thumbnail of a file
the index holds, and refuses any other path.
"""

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval import store
from retrieval.query import parse_query
from retrieval.spec import apply_search_params
from retrieval.thumbnails import Thumbnails
from vlm.clip import Clip, load_clip
from vlm.errors import VlmError
from vlm.images import ImageSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int  # 1 = best
    score: float  # cosine similarity to the query
    path: str  # absolute path of the image


class Searcher:
    def __init__(self, *, index_dir: Path, manifest: store.Manifest, index, meta, clip: Clip):
        self.index_dir, self.manifest, self.index, self.clip = Path(index_dir), manifest, index, clip
        self.root = Path(manifest.root)
        self._meta = meta
        self._lock = threading.Lock()  # one sqlite connection, shared by the app's threads
        self._thumbnails = Thumbnails()

    @classmethod
    def open(cls, index_dir: str | Path, *, model: str | None = None) -> "Searcher":
        """Open an index for searching.

        Raises:
            VlmError: missing or corrupt index, or `model` differs from the index's model.
        """
        manifest, index, meta = _read_current_version(Path(index_dir))
        apply_search_params(index, manifest.search_params)
        clip = load_clip(model or manifest.model)
        if clip.fingerprint != manifest.model_fingerprint:
            asked = model or f"{manifest.model} as it loads now"
            raise VlmError(
                f"{index_dir} was built with {manifest.model} (weights {manifest.model_fingerprint}) "
                f"but the query model is {asked} (weights {clip.fingerprint}); search with the same model or rebuild the index"
            )
        return cls(
            index_dir=Path(index_dir),
            manifest=manifest,
            index=index,
            meta=meta,
            clip=clip,
        )

    @property
    def count(self) -> int:
        return self.index.ntotal

    def text_vector(self, query: str) -> np.ndarray:
        """(D,) normalised vector of a query with optional weights and negative terms."""
        terms = parse_query(query)
        for term in terms:
            if len(self.clip.tokenizer.encode(term.text)) + 2 > self.clip.context_length:
                log.warning(
                    "query term truncated to the model's %d-token context: %.60s...",
                    self.clip.context_length,
                    term.text,
                )
        vectors = self.clip.encode_texts([t.text for t in terms]).numpy()
        return _normalise(np.array([t.weight for t in terms], np.float32) @ vectors)

    def image_vector(self, image: ImageSource) -> np.ndarray:
        return self.clip.encode_images([image]).numpy()[0]

    def search_text(self, query: str, *, k: int = 10, min_score: float | None = None) -> list[Hit]:
        return self.search_vector(self.text_vector(query), k=k, min_score=min_score)

    def query_vector(self, *, text: str | None = None, image: ImageSource | None = None) -> np.ndarray:
        """(D,) normalised vector of a search: the text query, the example image, or both summed."""
        if image is None:
            return self.text_vector(text or "")
        vector = self.image_vector(image)
        return _normalise(vector + self.text_vector(text)) if text else vector

    def search_image(
        self, image: ImageSource, *, k: int = 10, min_score: float | None = None, text: str | None = None
    ) -> list[Hit]:
        """Images like `image` (plus `text` terms, if given)."""
        return self.search_vector(self.query_vector(text=text, image=image), k=k, min_score=min_score)

    def search_vector(self, vector: np.ndarray, *, k: int = 10, min_score: float | None = None) -> list[Hit]:
        if k < 1:
            raise VlmError(f"k must be at least 1, got {k}")
        k = min(k, self.count)
        if k == 0:
            return []
        scores, ids = self.index.search(np.ascontiguousarray(vector, np.float32)[None], k)
        hits = []
        for score, content_id in zip(scores[0].tolist(), ids[0].tolist()):
            if content_id < 0 or (min_score is not None and score < min_score):
                continue
            hits.append(Hit(len(hits) + 1, score, str(self.root / self._path_of(content_id))))
        return hits

    def _path_of(self, content_id: int) -> str:
        with self._lock:
            row = self._meta.execute(
                "SELECT path FROM files WHERE content_id = ? ORDER BY path LIMIT 1", (content_id,)
            ).fetchone()
        return row[0]

    def resolve(self, path: str | Path) -> Path | None:
        """`path` as an indexed file inside the folder, or None. Guards what the app serves."""
        try:
            relative = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None
        with self._lock:
            found = self._meta.execute("SELECT 1 FROM files WHERE path = ?", (relative,)).fetchone()
        return self.root / relative if found else None

    def thumbnail(self, path: str | Path) -> bytes:
        """JPEG bytes of a small thumbnail of an indexed file, cached (see retrieval.thumbnails).

        Raises:
            KeyError: `path` is not a file the index holds inside its folder (checked against
                the index's own paths before anything is opened: no `..` or symlink way out).
            VlmError: the file cannot be read as an image.
        """
        resolved = self.resolve(path)
        if resolved is None:
            raise KeyError(f"not an indexed file: {str(path)[:200]}")
        return self._thumbnails.get(resolved)

    def close(self) -> None:
        self._meta.close()


def _read_current_version(index_dir: Path, *, attempts: int = 3):
    """(manifest, FAISS index, metadata connection) of one version. Readers take no lock: an
    update that commits while this reads deletes the version being read, so a failure is
    retried with the new manifest; it is raised when the manifest did not change."""
    for attempt in range(attempts):
        manifest = store.read_manifest(index_dir)
        try:
            return manifest, store.read_faiss(index_dir, manifest), store.connect_meta(index_dir, manifest)
        except VlmError:
            if attempt == attempts - 1 or store.read_manifest(index_dir).version == manifest.version:
                raise


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    if norm < 1e-8:
        raise VlmError("the query's terms cancel out; give a positive term")
    return (vector / norm).astype(np.float32)
