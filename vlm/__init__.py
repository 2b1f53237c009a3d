"""vlmstack: CLIP search, LLaVA- and Flamingo-style visual question answering, captioning."""

from vlm.clip import load_clip
from vlm.load import load_vlm

__all__ = ["load_clip", "load_vlm"]
