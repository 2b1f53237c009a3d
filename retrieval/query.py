"""Text queries with weights and negative terms.

    "red circle"               one term
    "red circle - triangle"    away from "triangle"
    "2:red + circle"           "red" counts twice as much as "circle"

Terms are joined by " + " or " - " (spaces around the sign, so "t-shirt" stays one word);
a term may start with "WEIGHT:" (a number up to 1000). The query vector is the weighted sum of the terms'
embeddings, normalised.
"""

import re
from dataclasses import dataclass

from vlm.errors import VlmError

_OPERATOR = re.compile(r"\s+([+-])(?:\s+|$)")
_WEIGHT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:(.*)$")
MAX_WEIGHT = 1000.0  # only ratios matter; far larger weights overflow float32 sums


@dataclass(frozen=True)
class Term:
    text: str
    weight: float  # negative for " - " terms


def parse_query(query: str) -> list[Term]:
    """Raises VlmError for an empty query, an empty term, or a weight above MAX_WEIGHT."""
    if not query.strip():
        raise VlmError("empty query")
    parts = _OPERATOR.split(query.strip())
    terms, sign = [], 1.0
    for i, part in enumerate(parts):
        if i % 2 == 1:
            sign = 1.0 if part == "+" else -1.0
            continue
        weight, text = 1.0, part
        match = _WEIGHT.match(part)
        if match:
            weight, text = float(match.group(1)), match.group(2)
            if weight > MAX_WEIGHT:  # also inf: float() of 400 digits
                shown = match.group(1) if len(match.group(1)) <= 12 else match.group(1)[:12] + "..."
                raise VlmError(f"query weight {shown} is too large; weights go up to {MAX_WEIGHT:g}")
        if not text.strip():
            raise VlmError(f"empty term in query {query!r}")
        terms.append(Term(text.strip(), sign * weight))
    return terms
