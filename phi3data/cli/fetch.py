"""The fetch command: ``phi3data fetch`` (images of a URL list into WebDataset shards plus a status table; the
list may be the image URLs of a finished interleaved run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

IMAGE_URL_LIST = "image_urls.parquet"


def fetch(
    urls: Annotated[Path, typer.Argument(help="URL list: .txt (one URL a line) or .jsonl/.parquet with url and "
                                              "caption columns; or the output directory of a finished "
                                              "pipelines/interleaved.toml run (its kept image URLs)")],
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
    list_only: Annotated[bool, typer.Option("--list-only", help="with a run directory: write its image URL list "
                                                                "to OUTPUT/image_urls.parquet and fetch nothing")]
    = False,
    captioned_only: Annotated[bool, typer.Option("--captioned-only", help="with a run directory: only images with a "
                                                                          "figure caption or alt text (alt-text "
                                                                          "pairs)")] = False,
) -> None:
    """Fetch the images of a URL list (img2dataset-like) into WebDataset tar shards and a per-URL status table.

    Example: phi3data fetch urls.txt --output out/images --workers 32 --retry-failed

    A rerun never fetches a URL that succeeded; it fetches URLs not attempted yet and, with --retry-failed, the
    failed ones.

    From an interleaved run: phi3data fetch out/interleaved --output out/images [--captioned-only] [--list-only]
    writes the run's distinct image URLs (sorted, with a caption: figure caption, else alt text) to
    OUTPUT/image_urls.parquet, then fetches them.
    """
    from phi3data.multimodal.fetch import DEFAULT_DISALLOWED, FetchConfig, fetch_urls
    from phi3data.multimodal.readers import read_all, read_url_list, reject_counts

    if urls.is_dir():
        from phi3data.multimodal.interleaved import write_image_url_list

        listed_path = output / IMAGE_URL_LIST
        count = write_image_url_list(urls, listed_path, captioned_only=captioned_only)
        typer.echo(f"wrote {count} image URLs of {urls} to {listed_path}")
        if list_only:
            return
        urls = listed_path
    elif list_only or captioned_only:
        raise ValueError("--list-only and --captioned-only read a run directory; "
                         f"{urls} is not one (pass the --output of `phi3data run pipelines/interleaved.toml`)")
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
