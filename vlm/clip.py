"""CLIP: a ViT image encoder and a causal text transformer in one embedding space (open_clip).

    clip = load_clip("clip-easyvqa")          # shipped name, model directory,
                                              # "open_clip:ARCH/TAG" or "open_clip:ARCH@/path"
    clip.encode_images([path_or_pil, ...])    # (N, D) float32, L2-normalised
    clip.encode_texts(["a red circle"])       # (N, D)

Architectures come from our presets (vlm/configs/*.json) or any open_clip model name.
A saved CLIP is a directory: config.json ({"kind": "clip", open_clip's model_cfg, image
mean/std}) + model.safetensors.
"""

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import open_clip
import torch
from torch import nn

from vlm import hub
from vlm.errors import VlmError
from vlm.images import ImageSource, ImageTransform
from vlm.schema import from_dict, schema_field

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).parent / "configs"
OPEN_CLIP_PREFIX = "open_clip:"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipConfig:
    model_cfg: dict  # open_clip's model config: embed_dim, vision_cfg, text_cfg, ...
    image_mean: tuple = OPENAI_MEAN  # per-channel normalisation the weights were trained with
    image_std: tuple = OPENAI_STD
    source: str = ""  # where the architecture came from (preset, open_clip name or tag)
    kind: str = field(default="clip", init=False)  # marks the directory as a CLIP model
    schema_version: int = schema_field()

    def __post_init__(self):
        """Refuse values no CLIP can be built from (ValueError naming the field); the
        normalisation lists that JSON gives become tuples."""
        cfg = self.model_cfg
        if not isinstance(cfg, dict) or not all(
            isinstance(cfg.get(tower), dict) for tower in ("vision_cfg", "text_cfg")
        ):
            raise ValueError(f"model_cfg must be an object with vision_cfg and text_cfg objects, not {cfg!r:.80}")
        if not hub.is_count(cfg.get("embed_dim")):
            raise ValueError(f"model_cfg.embed_dim must be a whole number of at least 1, not {cfg.get('embed_dim')!r}")
        self.image_mean = _per_channel("image_mean", self.image_mean, positive=False)
        self.image_std = _per_channel("image_std", self.image_std, positive=True)


def _per_channel(name: str, value, *, positive: bool) -> tuple:
    """Three numbers, one per RGB channel (above 0 if `positive`), as a tuple; else ValueError."""
    numbers = isinstance(value, (list, tuple)) and len(value) == 3
    numbers = numbers and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not numbers or (positive and min(value) <= 0):
        raise ValueError(f"{name} must be 3 {'positive ' if positive else ''}numbers (R, G, B), not {value!r:.80}")
    return tuple(value)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("clip-*.json"))


def clip_config(arch: str) -> ClipConfig:
    """Config for a preset name (vlm/configs/) or an open_clip architecture name.

    Raises:
        ValueError: neither a preset nor an open_clip architecture.
    """
    preset = PRESETS_DIR / f"{arch}.json"
    if preset.is_file():
        data = json.loads(preset.read_text())
        return ClipConfig(
            model_cfg=data["model_cfg"],
            image_mean=tuple(data["image_mean"]),
            image_std=tuple(data["image_std"]),
            source=arch,
        )
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(
            f"unknown CLIP architecture {arch!r}; presets: {', '.join(preset_names())}; "
            "or any name from open_clip.list_models()"
        )
    return ClipConfig(model_cfg=model_cfg, source=arch)


class Clip(nn.Module):
    """An open_clip model with its tokenizer and image preprocessing."""

    def __init__(self, *, config: ClipConfig):
        super().__init__()
        self.config = config
        model_cfg = dict(config.model_cfg)
        if "multimodal_cfg" in model_cfg:
            raise VlmError(f"{config.source}: CoCa-style models are not supported")
        custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg["text_cfg"]
        model_cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        self.model = model_cls(**model_cfg)
        text_cfg = model_cfg["text_cfg"]
        context_length = text_cfg.get("context_length", 77)
        if "hf_tokenizer_name" in text_cfg:
            self.tokenizer = open_clip.tokenizer.HFTokenizer(
                text_cfg["hf_tokenizer_name"], context_length=context_length
            )
        else:
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        self.fingerprint = "random-init"  # names the weights; set by the loaders

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def embed_dim(self) -> int:
        return self.config.model_cfg["embed_dim"]

    @property
    def transform(self) -> ImageTransform:
        """Image source -> (3, S, S) model input; picklable for DataLoader workers."""
        return ImageTransform(self.image_size, tuple(self.config.image_mean), tuple(self.config.image_std))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, context_length) token ids; longer texts are cut to the context."""
        return self.tokenizer(list(texts))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the image tower computes in (bfloat16 after a bfloat16 load)."""
        return next(self.model.visual.parameters()).dtype

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D), L2-normalised."""
        return self.model.encode_image(pixels.to(self.dtype), normalize=True)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, D), L2-normalised (pooled at the end-of-text token)."""
        return self.model.encode_text(tokens, normalize=True)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageSource], *, batch_size: int = 256) -> torch.Tensor:
        """(N, D) float32 embeddings of paths/bytes/PIL images. Raises ImageError."""
        chunks = []
        for start in range(0, len(images), batch_size):
            transform = self.transform
            pixels = torch.stack([transform(im) for im in images[start : start + batch_size]])
            chunks.append(self.image_features(pixels).float())
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """(N, D) float32 embeddings of texts."""
        chunks = [
            self.text_features(self.tokenize(texts[s : s + batch_size])).float()
            for s in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    def save(self, directory: str | Path, *, dtype: torch.dtype | None = None) -> None:
        """Write config.json + model.safetensors (optionally cast, e.g. fp16 to ship)."""
        directory = Path(directory)
        hub.save_config(directory, asdict(self.config))
        hub.save_module(directory, self.model, dtype=dtype)


def build_clip(arch: str) -> Clip:
    """A randomly initialised CLIP of a preset or open_clip architecture."""
    return Clip(config=clip_config(arch))


def load_clip(spec: str, *, precision=None) -> Clip:
    """Load a CLIP by shipped name, model directory, "open_clip:ARCH/TAG" or "open_clip:ARCH@PATH".

    Args:
        precision: a vlm.quantize.Precision (bfloat16, int8); None: the one set by
            vlm.quantize.clip_precision, by default float32.
    Raises:
        VlmError: unknown name, missing file, or weights that don't fit the architecture.
    """
    from vlm.quantize import current_clip_precision

    clip = _load_clip(spec).eval()
    return (precision or current_clip_precision()).apply(clip)


def _load_clip(spec: str) -> Clip:
    if spec.startswith(OPEN_CLIP_PREFIX):
        clip = _load_open_clip(spec[len(OPEN_CLIP_PREFIX) :])
    else:
        directory = hub.resolve_dir(spec)
        if directory is None:
            raise VlmError(
                f"unknown CLIP model {spec!r}: not a shipped name ({', '.join(hub.shipped_names()) or 'none'}), "
                "not a model directory, and not open_clip:ARCH/TAG or open_clip:ARCH@/path/to/weights"
            )
        config = hub.read_config(directory)
        if config.get("kind") != "clip":
            raise VlmError(f"{spec}: not a CLIP model directory (kind={config.get('kind')!r})")
        with hub.config_errors(directory, "clip"):
            clip = Clip(config=from_dict(ClipConfig, config, str(directory / hub.CONFIG_FILE)))
        hub.load_module(directory, clip.model)
        clip.fingerprint = hub.file_fingerprint(directory / hub.WEIGHTS_FILE)
    return clip


def _load_open_clip(rest: str) -> Clip:
    if "@" in rest:
        arch, path = rest.split("@", 1)
        clip = _arch_clip(arch)
        _load_state(clip, _read_weights_file(Path(path).expanduser()), path)
        clip.fingerprint = hub.file_fingerprint(Path(path).expanduser())
        clip.config.source = f"{arch}@{path}"
        return clip
    arch, _, tag = rest.partition("/")
    clip = _arch_clip(arch)
    if not tag:
        raise VlmError(f"open_clip:{rest}: give a pretrained tag (ARCH/TAG) or a weights file (ARCH@PATH)")
    pretrained = open_clip.get_pretrained_cfg(arch, tag)
    if not pretrained:
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise VlmError(f"open_clip:{rest}: unknown tag; {arch} has: {', '.join(tags) or 'none'}")
    try:
        model = open_clip.create_model(arch, pretrained=tag)
    except Exception as e:  # network failures surface as many exception types
        raise VlmError(
            f"open_clip:{rest}: could not fetch the pretrained weights ({type(e).__name__}: {e}); "
            f"offline, download them elsewhere and pass open_clip:{arch}@/path/to/weights"
        ) from None
    _load_state(clip, model.state_dict(), rest)
    clip.config.image_mean = tuple(pretrained.get("mean") or OPENAI_MEAN)
    clip.config.image_std = tuple(pretrained.get("std") or OPENAI_STD)
    clip.config.source = rest
    clip.fingerprint = rest
    return clip


def _arch_clip(arch: str) -> Clip:
    try:
        return build_clip(arch)
    except ValueError as e:
        raise VlmError(str(e)) from None


def _read_weights_file(path: Path) -> dict:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True."""
    if not path.is_file():
        raise VlmError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        return hub.read_weights(path)[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VlmError(f"{path}: not a plain tensor checkpoint ({type(e).__name__}); use safetensors") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_state(clip: Clip, state: dict, name: str) -> None:
    try:
        clip.model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise VlmError(f"{name}: weights do not fit the architecture ({first})") from None
