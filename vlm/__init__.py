"""vlmstack: CLIP search, LLaVA- and Flamingo-style visual question answering, captioning."""

from vlm.clip import load_clip

__all__ = ["load_clip"]
