"""int8 weights: for inference (`--quantize int8`) and for a frozen base under LoRA
(`vlmstack finetune --quantize-base int8`, QLoRA-style).

Inference uses torch's dynamic int8 quantisation (torch.ao `quantize_dynamic`): every
nn.Linear gets int8 weights (per output channel) and quantises its input per batch, so
the matrix products run on the CPU's int8 kernels (fbgemm / x86 with AVX2 or VNNI).
Measured here (2 cores, AVX512-VNNI, torch 2.14.1): a 768x3072 MLP 4x faster than
float32 on a batch, 6x on one token; torchao 0.18's int8 configs were slower than
torch.ao on this CPU (no fused int8 CPU kernel), so torchao is not used. torch 2.14 marks torch.ao's quantized tensors deprecated (to be
removed in a later release; torch is pinned to 2.14.1 here): torchao is where this moves.

Where the int8 kernels are missing, `quantize_int8` leaves the model in float32 and
warns naming the missing kernel. nn.MultiheadAttention's projections (open_clip's
attention) stay float32: torch does not quantise them dynamically.

Training cannot go through torch.ao's quantised layers (no gradient to their input);
`Int8Linear` keeps int8 weights and dequantises them in forward, so LoRA branches on top
get their gradients while the frozen base takes a quarter of the memory.
"""

import contextlib
import logging
import warnings
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlm.errors import VlmError

log = logging.getLogger(__name__)
QUANTIZE_CHOICES = ("int8",)  # --quantize values
INT8_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")  # torch's quantized engines, preferred first


def check_quantize(quantize: str | None, dtype: torch.dtype) -> None:
    """Raises VlmError for an unknown --quantize value or int8 with a non-float32 dtype."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise VlmError(f"unknown --quantize {quantize!r}; choose {', '.join(QUANTIZE_CHOICES)}")
    if dtype != torch.float32:
        raise VlmError("--quantize int8 computes in float32 around its int8 matrix products; drop --dtype bfloat16")


def int8_engine() -> str | None:
    """The quantized engine whose dynamic int8 linear kernel runs on this CPU, or None
    (with a warning that names what is missing)."""
    engines = [e for e in INT8_ENGINES if e in torch.backends.quantized.supported_engines]
    if not engines:
        log.warning(
            "int8 off: this torch build has no quantized engine (%s) for quantized::linear_dynamic; "
            "computing in float32",
            "/".join(INT8_ENGINES),
        )
        return None
    probe = nn.Linear(8, 8)
    for engine in engines:
        try:
            torch.backends.quantized.engine = engine
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (UserWarning, DeprecationWarning))
                quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(probe), {nn.Linear}, dtype=torch.qint8)
            quantized(torch.randn(2, 8))
            return engine
        except RuntimeError as e:
            log.debug("engine %s failed: %s", engine, e)
    log.warning(
        "int8 off: quantized::linear_dynamic does not run on this CPU with any engine (%s); computing in float32",
        "/".join(engines),
    )
    return None


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every nn.Linear of `model` (vision tower, projector, LM, CLIP towers) as a dynamic
    int8 linear layer with per-output-channel weight scales, in place; returns the model
    (unchanged where int8 kernels are missing)."""
    if int8_engine() is None:
        return model
    spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    with warnings.catch_warnings():  # torch 2.14 deprecates torch.ao; the pin keeps it (see above)
        warnings.simplefilter("ignore", (UserWarning, DeprecationWarning))
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            module.int8_original_dtype = torch.float32  # open_clip asks its MLPs for their dtype by this name
    return model


@dataclass(frozen=True)
class Precision:
    """How a model computes at inference: --dtype and --quantize."""

    dtype: str = "float32"  # "float32" or "bfloat16" (vlm.load.compute_dtype)
    quantize: str | None = None  # None or "int8"

    def apply(self, model: nn.Module) -> nn.Module:
        """`model` cast and/or quantised in place (falls back to float32 with a warning
        where the CPU lacks bfloat16 or int8 kernels); returns it.

        Raises:
            VlmError: an unknown dtype or quantize value, or int8 with bfloat16.
        """
        from vlm.load import compute_dtype

        if self == Precision():
            return model
        dtype = compute_dtype(self.dtype)
        check_quantize(self.quantize, dtype)
        model.to(dtype)
        return quantize_int8(model) if self.quantize == "int8" else model


_clip_precision: ContextVar[Precision] = ContextVar("clip_precision", default=Precision())


@contextlib.contextmanager
def clip_precision(precision: Precision):
    """Within it, load_clip loads CLIPs in `precision` unless told otherwise: for code
    that loads a CLIP by name itself (retrieval's index build and embed)."""
    token = _clip_precision.set(precision)
    try:
        yield
    finally:
        _clip_precision.reset(token)


def current_clip_precision() -> Precision:
    return _clip_precision.get()


class Int8Linear(nn.Linear):
    """A frozen Linear holding int8 weights with one float scale per output row; forward
    dequantises (so gradients reach its input and any LoRA branch around it). A subclass of
    nn.Linear so that peft wraps it like one."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # (out, 1)
        self.register_buffer("weight", torch.round(weight / scale).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def int8_base(module: nn.Module, *, keep=lambda name, linear: False) -> int:
    """Replace each nn.Linear under `module` by an Int8Linear in place, except those for
    which keep(name, linear) is true (a tied output head, modules that will be trained).
    Returns how many were replaced."""
    replaced = 0
    for name, child in list(module.named_modules()):
        if type(child) is nn.Linear and not keep(name, child):
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, Int8Linear(child))
            replaced += 1
    return replaced
