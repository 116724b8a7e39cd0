"""URL blocklist: drop documents from listed domains (and their subdomains) or with listed URL substrings."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from phi3data.io.inputs import file_sha256
from phi3data.pipelines.base import Filter, StageParams, register


class UrlBlocklistParams(StageParams):
    domains: list[str] = []
    domains_file: str | None = None
    """A text file with one domain per line (# comments allowed)."""
    url_substrings: list[str] = []


@register
class UrlBlocklist(Filter):
    type_name = "url_blocklist"
    Params = UrlBlocklistParams
    params: UrlBlocklistParams

    def _domains_file(self) -> Path:
        path = Path(self.params.domains_file)
        if not path.exists():
            raise FileNotFoundError(f"url_blocklist domains_file not found: {path}")
        return path

    def identity(self) -> dict:
        return {"domains_file_sha256": file_sha256(self._domains_file())} if self.params.domains_file else {}

    def setup(self) -> None:
        domains = {d.lower().strip(".") for d in self.params.domains}
        if self.params.domains_file:
            path = self._domains_file()
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip().lower()
                if line:
                    domains.add(line.strip("."))
        self._domains = domains
        self._substrings = [s.lower() for s in self.params.url_substrings]

    def reasons(self, batch: pa.Table):
        self.ensure_setup()
        out: list[str | None] = []
        for url in batch.column("url").to_pylist():
            out.append(self._check(url) if url else None)
        return out, None

    def _check(self, url: str) -> str | None:
        host = (urlsplit(url).hostname or "").lower()
        parts = host.split(".")
        for i in range(len(parts) - 1):
            if ".".join(parts[i:]) in self._domains:
                return "blocked_domain"
        lowered = url.lower()
        if any(s in lowered for s in self._substrings):
            return "blocked_substring"
        return None
