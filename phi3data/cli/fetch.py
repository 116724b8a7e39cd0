"""The fetch command: ``phi3data fetch`` (images of a URL list into WebDataset shards plus a status table)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def fetch(
    urls: Annotated[Path, typer.Argument(help="URL list: .txt (one URL a line) or .jsonl/.parquet with url and "
                                              "caption columns")],
    output: Annotated[Path, typer.Option("--output", "-o", help="directory for fetch-NNNNN.tar shards and the "
                                                                "status tables")],
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="fetch the URLs that failed in earlier runs "
                                                                      "again (successes are never refetched)")]
    = False,
    workers: Annotated[int, typer.Option(help="threads fetching at once")] = 16,
    per_host: Annotated[int, typer.Option(help="most requests in flight to one host")] = 4,
    min_delay: Annotated[float, typer.Option(help="least seconds between two requests to one host")] = 0.0,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 10.0,
    retries: Annotated[int, typer.Option(help="retries on connection errors, timeouts, 429 and 5xx")] = 3,
    url_key: Annotated[str, typer.Option(help="URL column of a .jsonl/.parquet list")] = "url",
    caption_key: Annotated[str, typer.Option(help="caption column of a .jsonl/.parquet list")] = "caption",
    ignore_opt_out: Annotated[bool, typer.Option("--ignore-opt-out", help="store images whose X-Robots-Tag says "
                                                                          "noai/noimageai/noindex/noimageindex")]
    = False,
) -> None:
    """Fetch the images of a URL list (img2dataset-like) into WebDataset tar shards and a per-URL status table.

    Example: phi3data fetch urls.txt --output out/images --workers 32 --retry-failed

    A rerun never fetches a URL that succeeded; it fetches URLs not attempted yet and, with --retry-failed, the
    failed ones.
    """
    from phi3data.multimodal.fetch import DEFAULT_DISALLOWED, FetchConfig, fetch_urls
    from phi3data.multimodal.readers import read_all, read_url_list, reject_counts

    if not urls.is_file():
        raise FileNotFoundError(f"URL list {urls} does not exist")
    listed = read_all(read_url_list(urls, url_key=url_key, caption_key=caption_key))
    if listed.rejects.num_rows:
        typer.echo(f"skipped {listed.rejects.num_rows} list entries: {reject_counts(listed.rejects)}")
    if listed.records is None or listed.records.num_rows == 0:
        raise ValueError(f"URL list {urls} has no http(s) URLs")
    config = FetchConfig(workers=workers, per_host=per_host, min_delay=min_delay, timeout=timeout, retries=retries,
                         disallowed_directives=() if ignore_opt_out else DEFAULT_DISALLOWED)
    result = fetch_urls(listed.records, output, retry_failed=retry_failed, config=config)
    typer.echo(f"fetched {len(result.rows)} URLs {result.counts()}, {result.skipped} already done"
               + (f"; wrote {result.shard} and {result.status_path}" if result.shard else ""))
