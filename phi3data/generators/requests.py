"""A generation request as a plan expands it: rendered messages, sampling parameters and where it came from.

A request's identity (:attr:`GenRequest.key`) is the hash of everything that decides its reply: the server, the
model, the rendered messages, every sampling parameter (seed included), the response schema, and the template's id
and content hash. The ledger is keyed by it, so a rerun sends only what has no answer, and a changed template,
parameter or server is a new request rather than a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from phi3data.generators.cache import normalise_base_url


@dataclass(frozen=True)
class GenRequest:
    """One request of a plan, before it is sent."""

    index: int
    """Position in the expanded plan (output rows follow it)."""
    messages: tuple[dict, ...]
    """Chat messages, e.g. ({"role": "user", "content": "..."},)."""
    params: dict[str, Any]
    """Sampling parameters sent with it: max_tokens, temperature, top_p, seed, n ..."""
    cell: dict[str, str]
    """The coverage cell: {"topic": ..., "audience": ..., "style": ...} (keys as the plan defines them)."""
    template_id: str
    template_hash: str
    seed_id: str | None = None
    """The id of the seed document/problem/outline it was rendered from, if any."""
    seed_text: str | None = None
    """The seed's text as given to the template (for the regurgitation check); not sent on its own."""
    schema: dict | None = None
    """A JSON schema for structured output (response_format), if the plan asks for one."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Plan-specific provenance (e.g. a gold answer) carried to the output row."""

    def key(self, server: str, model: str) -> str:
        """The content key of this request on a server (base URL) and model."""
        blob = json.dumps({"server": normalise_base_url(server), "model": model, "messages": list(self.messages),
                           "params": self.params, "schema": self.schema, "template": [self.template_id,
                                                                                      self.template_hash]},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()
