"""Progress bars: tqdm, redrawn often on a terminal and rarely in a log file."""

import sys

from tqdm import tqdm


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm with a redraw interval suited to where stderr goes (kwargs win)."""
    kwargs.setdefault("mininterval", 0.2 if sys.stderr.isatty() else 15.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
