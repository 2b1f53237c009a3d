"""Projectors from vision features to the language model's embedding space, built from a
string: "linear", or "mlpNx_ACT": N linear layers with activation ACT between (LLaVA-1.5
uses "mlp2x_gelu"; ACT is one of ACTIVATIONS). `bias=False` builds the linear layers without bias."""

import re

from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_(\w+)$")
ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def build_projector(name: str, in_dim: int, out_dim: int, *, bias: bool = True) -> nn.Module:
    """Raises ValueError for an unknown name."""
    if name == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    match = _MLP.match(name)
    if match and int(match.group(1)) >= 1 and match.group(2) in ACTIVATIONS:
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
        for _ in range(int(match.group(1)) - 1):
            layers += [ACTIVATIONS[match.group(2)](), nn.Linear(out_dim, out_dim, bias=bias)]
        return nn.Sequential(*layers)
    raise ValueError(
        f"unknown projector {name!r}; use 'linear' or 'mlpNx_ACT' (e.g. 'mlp2x_gelu'), ACT one of {', '.join(ACTIVATIONS)}"
    )
