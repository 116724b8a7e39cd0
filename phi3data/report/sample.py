"""Deterministic samples and short excerpts: the same directory always gives the same report."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import xxhash

EXCERPT_CHARS = 600


def id_hash(value: object) -> int:
    """A stable 64-bit hash of an id (the order samples are drawn in: smallest first)."""
    return xxhash.xxh64_intdigest(str(value).encode("utf-8", "replace"))


def smallest(rows: Iterable[dict], k: int, key: str = "id") -> list[dict]:
    """The ``k`` rows with the smallest hash of ``row[key]``, in that order."""
    return heapq.nsmallest(k, rows, key=lambda row: id_hash(row.get(key)))


def excerpt(text: object, limit: int = EXCERPT_CHARS) -> str:
    """The first ``limit`` characters of a text (bytes decoded leniently), marked when cut."""
    if text is None:
        return ""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "replace")
    text = str(text)
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


class Reservoir:
    """Keeps the ``k`` smallest-hash rows per group while rows stream past (bounded memory)."""

    def __init__(self, k: int):
        self.k = k
        self.groups: dict[str, list[tuple[int, int, dict]]] = {}
        self._n = 0

    def offer(self, group: str, row_id: object, make_row) -> None:
        """Offer a row; ``make_row()`` builds it only when it is kept (texts are cut only for those)."""
        h = id_hash(row_id)
        heap = self.groups.setdefault(group, [])
        if len(heap) < self.k:
            self._n += 1
            heapq.heappush(heap, (-h, self._n, make_row()))
        elif -heap[0][0] > h:
            self._n += 1
            heapq.heapreplace(heap, (-h, self._n, make_row()))

    def get(self, group: str) -> list[dict]:
        return [row for _, _, row in sorted(self.groups.get(group, []), key=lambda t: -t[0])]
