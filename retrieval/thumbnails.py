"""Small JPEG thumbnails of indexed pictures, made once and kept in a bounded LRU cache.

    thumbnails = Thumbnails(side=256, capacity=1024)
    thumbnails.get(path)          # JPEG bytes; the file is read only on the first call

Which paths may be opened is the caller's decision (Searcher.thumbnail allows only files
the index holds); this module only makes and remembers the pictures.
"""

import io
import threading
from collections import OrderedDict
from pathlib import Path

from vlm.data.webdataset import image_source
from vlm.images import load_image

THUMBNAIL_SIDE = 256  # pixels on the long side; smaller pictures are not enlarged
THUMBNAIL_CACHE = 1024  # thumbnails kept (~5-20 KB each)
JPEG_QUALITY = 85


def make_thumbnail(path: str | Path, *, side: int = THUMBNAIL_SIDE) -> bytes:
    """JPEG bytes of the picture at `path` (a file or a `shard.tar#member`), at most
    `side` pixels on its long side.

    Raises:
        VlmError: the file cannot be read as an image (ImageError), or names no shard member.
    """
    picture = load_image(image_source(str(path)))
    picture.thumbnail((side, side))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class Thumbnails:
    """Thread-safe LRU cache of make_thumbnail results by path."""

    def __init__(self, *, side: int = THUMBNAIL_SIDE, capacity: int = THUMBNAIL_CACHE):
        self.side, self.capacity = side, capacity
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | Path) -> bytes:
        """Raises VlmError for an unreadable picture (not cached: it may be fixed later)."""
        key = str(path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = make_thumbnail(key, side=self.side)  # outside the lock: other callers keep going
        with self._lock:
            self._cache[key] = data
            self._cache.move_to_end(key)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data
