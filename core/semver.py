"""Minimal semantic-version parsing and comparison for node versions (``MAJOR.MINOR.PATCH``)."""

from __future__ import annotations

import re
from typing import NamedTuple

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class Version(NamedTuple):
    """A parsed ``MAJOR.MINOR.PATCH`` version; tuples compare in version order."""

    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_version(text: str) -> Version | None:
    """The parsed version, or ``None`` if ``text`` is not ``MAJOR.MINOR.PATCH``."""
    if not isinstance(text, str):
        return None
    match = _SEMVER.match(text.strip())
    if match is None:
        return None
    return Version(*(int(g) for g in match.groups()))
