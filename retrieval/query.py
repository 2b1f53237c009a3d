"""Text queries with weights and negative terms.

    "red circle"               one term
    "red circle - triangle"    away from "triangle"
    "2:red + circle"           "red" counts twice as much as "circle"

Terms are joined by " + " or " - " (spaces around the sign, so "t-shirt" stays one word);
a term may start with "WEIGHT:". The query vector is the weighted sum of the terms'
embeddings, normalised.
"""

import re
from dataclasses import dataclass

from vlm.errors import VlmError

_OPERATOR = re.compile(r"\s+([+-])(?:\s+|$)")
_WEIGHT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:(.*)$")


@dataclass(frozen=True)
class Term:
    text: str
    weight: float  # negative for " - " terms


def parse_query(query: str) -> list[Term]:
    """Raises VlmError for an empty query or an empty term."""
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
        if not text.strip():
            raise VlmError(f"empty term in query {query!r}")
        terms.append(Term(text.strip(), sign * weight))
    return terms
