"""Image retrieval over folders: FAISS index + metadata, incremental updates, search."""

from retrieval.index import IndexReport, build_index, update_index
from retrieval.search import Hit, Searcher

__all__ = ["Hit", "IndexReport", "Searcher", "build_index", "update_index"]
