"""Projectors from vision features to the language model's embedding space, built from a
string: "linear", or "mlpNx_gelu" (N linear layers with GELU between, LLaVA-1.5 uses 2)."""

import re

from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Raises ValueError for an unknown name."""
    if name == "linear":
        return nn.Linear(in_dim, out_dim)
    match = _MLP.match(name)
    if match and int(match.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(int(match.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector {name!r}; use 'linear' or 'mlpNx_gelu' (e.g. 'mlp2x_gelu')")
