"""The record types every dataset reader produces. Image paths are absolute strings."""

from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionRecord:
    image: str
    caption: str


@dataclass(frozen=True)
class VqaRecord:
    image: str
    question: str
    answer: str
