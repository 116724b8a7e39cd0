"""Interleaved image-text documents from web pages (OBELICS-style), and the image URL lists they yield.

:func:`extract_page` parses a page's HTML once (resiliparse) and walks its body in document order. It emits
paragraph-level text runs (block elements and ``<br>`` end a run; white space is collapsed) and images, as the
aligned lists of :data:`phi3data.multimodal.records.INTERLEAVED_WEB_SCHEMA`: position i is a text run or an image
URL with its alt text, its ``<figure>``'s ``<figcaption>`` and the width/height its attributes declare. Images
stay URLs here; ``phi3data fetch`` downloads them later.

Boilerplate is not walked: ``script``/``style``/``nav``/``footer``/``aside``/form controls and similar tags, a
site ``<header>`` (outside ``<article>``/``<main>``: a child of ``<body>`` or one holding a ``<nav>``), hidden
elements, landmark roles (navigation, banner, contentinfo, complementary, search) and, by default, elements whose
class or id names a menu, footer, sidebar, share bar, cookie banner and the like, unless they hold the main content
(a ``main``, ``article`` or ``h1``: some sites wrap a whole page in one). ``<noscript>`` is walked: it holds the
page as crawlers see it (Discourse forums) and the real ``<img>`` of lazy-loaded images.

An image's URL is the largest candidate of its ``srcset`` (``w`` descriptors before ``x``; lazy-loading
``data-srcset`` and a ``<picture>``'s ``<source>`` elements count too), else its lazy ``data-src`` (or
``data-lazy-src``, ``data-original``), else ``src``; it is resolved against ``<base href>`` and the page URL (a
page stored under a non-http name falls back to its canonical link or ``og:url``), and its fragment is removed.
Every image not kept is counted under one reason (checked in this order):

- ``boilerplate``: inside a block that is not walked (above), or hidden;
- ``no_src``: no URL at all; ``data_uri``: only inline ``data:`` URIs (placeholders, inlined icons);
- ``unresolvable``: a relative URL on a page with no http(s) address to resolve it against;
- ``bad_scheme``: resolves to something other than http(s) (``javascript:``, ``blob:``, ``file:`` ...);
- ``tracking_pixel``: a declared width or height at or below ``tracking_max_side`` (1x1 beacons, spacers);
- ``tracker_host``: a known web-analytics or ad beacon host (``TRACKER_HOSTS``: their ``<noscript>`` pixels often
  declare no size);
- ``excluded_extension``: the URL's path ends in an excluded extension (``svg``, ``ico``: logos and icons, and
  vector files a vision encoder cannot read);
- ``too_small``: a declared width or height below ``min_side`` (undeclared sizes pass: they are checked
  once fetched);
- ``repeated_in_page``: the page already holds this URL.

Images that appear on many pages (logos, social buttons) are removed corpus-wide by the ``image_url_frequency``
stage (:mod:`phi3data.pipelines.stages.interleaved`), keyed by :func:`url_key`.

Side products of a finished run: :func:`image_url_list` (distinct image URLs with a caption, for ``phi3data
fetch``) and :func:`alt_text_pairs` (image URL + alt text or caption, in ``URL_SCHEMA``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from phi3data.io.writers import commit, tmp_path_for
from phi3data.multimodal.records import make_urls

IMAGE_DROP_REASONS = ("boilerplate", "no_src", "data_uri", "unresolvable", "bad_scheme", "tracking_pixel",
                      "tracker_host", "excluded_extension", "too_small", "repeated_in_page")

SKIP_TAGS = frozenset({"script", "style", "template", "title", "nav", "footer", "aside", "iframe", "svg", "math",
                       "button", "select", "textarea", "object", "embed", "canvas", "video", "audio", "map", "dialog",
                       "head"})
BOILERPLATE_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar",
                               "dialog", "alertdialog"})
BLOCK_TAGS = frozenset({"p", "div", "section", "article", "main", "header", "h1", "h2", "h3", "h4", "h5", "h6",
                        "ul", "ol", "li", "dl", "dt", "dd", "blockquote", "pre", "table", "thead", "tbody", "tfoot",
                        "tr", "caption", "figure", "figcaption", "hr", "address", "details", "summary", "center",
                        "body", "fieldset", "picture"})
CELL_TAGS = frozenset({"td", "th"})
# a class or id naming a whole boilerplate block ("site-footer", "main-nav", "share-buttons"), not one merely
# mentioning it ("has-sidebar" on a content wrapper)
BOILERPLATE_NAME = re.compile(
    r"^(?:site|page|main|global|top|bottom|primary|secondary|header|mobile)?[-_]?"
    r"(?:nav|navbar|navigation|menu|footer|sidebar|breadcrumbs?|cookies?|cookie[-_]?(?:banner|notice|consent)|"
    r"share|sharing|social|related|newsletter|subscribe|comments?|advert|advertisement|ads|banner-ad|skip-link)"
    r"(?:[-_](?:menu|bar|nav|links?|list|wrap|wrapper|container|area|widgets?|buttons?|icons?|posts|articles|"
    r"box|block|inner|section|content))?$", re.IGNORECASE)
TRACKER_HOSTS = ("scorecardresearch.com", "google-analytics.com", "doubleclick.net", "googlesyndication.com",
                 "googleadservices.com", "quantserve.com", "adnxs.com", "bat.bing.com", "pixel.wp.com",
                 "stats.wp.com", "analytics.twitter.com", "facebook.com/tr", "ct.pinterest.com", "pixel.quantserve.com")
LAZY_SRC_ATTRS = ("data-src", "data-lazy-src", "data-original")
SRCSET_ATTRS = ("data-srcset", "data-lazy-srcset", "srcset")
_LEADING_INT = re.compile(r"^\s*(\d{1,6})(?:\.\d*)?\s*(?:px)?\s*$")
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)


@dataclass(frozen=True)
class ExtractOptions:
    """How pages are walked and which images are kept (the ``extract_interleaved`` stage's parameters)."""

    min_side: int = 64
    tracking_max_side: int = 1
    excluded_extensions: tuple[str, ...] = ("svg", "ico")
    boilerplate_classes: bool = True
    tracker_hosts: tuple[str, ...] = TRACKER_HOSTS


@dataclass
class Page:
    """One page's aligned lists, how many ``<img>`` tags it had, and the (reason, url) of every image dropped."""

    texts: list[str | None] = field(default_factory=list)
    image_urls: list[str | None] = field(default_factory=list)
    alts: list[str | None] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    widths: list[int | None] = field(default_factory=list)
    heights: list[int | None] = field(default_factory=list)
    img_tags: int = 0
    dropped: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(u is not None for u in self.image_urls)

    @property
    def text(self) -> str:
        return "\n".join(t for t in self.texts if t is not None)

    def add_text(self, text: str) -> None:
        self._add(text, None, None, None, None, None)

    def add_image(self, url: str, alt: str | None, caption: str | None, width: int | None,
                  height: int | None) -> None:
        self._add(None, url, alt, caption, width, height)

    def _add(self, text, url, alt, caption, width, height) -> None:
        self.texts.append(text)
        self.image_urls.append(url)
        self.alts.append(alt)
        self.captions.append(caption)
        self.widths.append(width)
        self.heights.append(height)

    def lists(self) -> dict[str, list]:
        return {"texts": self.texts, "image_urls": self.image_urls, "alts": self.alts, "captions": self.captions,
                "widths": self.widths, "heights": self.heights}


def normalise_space(text: str | None) -> str:
    """Collapse runs of white space (line breaks included) to one space and strip."""
    return " ".join(text.split()) if text else ""


def url_key(url: str) -> int:
    """The 64-bit key of an image URL (what the corpus-wide frequency count groups by)."""
    return xxhash.xxh64_intdigest(url)


def largest_srcset_candidate(srcset: str | None) -> str | None:
    """The URL of a ``srcset``'s largest candidate: the widest ``w`` descriptor, else the highest density ``x``
    (a candidate without a descriptor is ``1x``). ``data:`` candidates are skipped."""
    best, best_rank = None, None
    for url, descriptor in _srcset_candidates(srcset or ""):
        if url.lower().startswith("data:"):
            continue
        rank = _descriptor_rank(descriptor)
        if rank is not None and (best_rank is None or rank > best_rank):
            best, best_rank = url, rank
    return best


def _srcset_candidates(srcset: str) -> Iterator[tuple[str, str]]:
    # URLs may hold commas (CDN resize parameters): a candidate ends at a comma that follows white space or a
    # descriptor, so split on ", " boundaries after reading each URL up to white space
    pos, n = 0, len(srcset)
    while pos < n:
        while pos < n and (srcset[pos].isspace() or srcset[pos] == ","):
            pos += 1
        start = pos
        while pos < n and not srcset[pos].isspace():
            pos += 1
        url = srcset[start:pos]
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            end = srcset.find(",", pos)
            end = n if end < 0 else end
            descriptor = srcset[pos:end].strip()
            pos = end + 1
        if url:
            yield url, descriptor


def _descriptor_rank(descriptor: str) -> tuple[int, float] | None:
    if not descriptor:
        return (0, 1.0)
    value, unit = descriptor.split()[0][:-1], descriptor.split()[0][-1:].lower()
    try:
        number = float(value)
    except ValueError:
        return None
    if unit == "w":
        return (1, number)
    if unit == "x":
        return (0, number)
    return None


def declared_size(value: str | None) -> int | None:
    """A width/height attribute as pixels (``"300"``, ``"300px"``); None when absent or relative (``"50%"``)."""
    if not value:
        return None
    match = _LEADING_INT.match(value)
    return int(match.group(1)) if match else None


def resolve_url(raw: str, base: str | None) -> tuple[str | None, str | None]:
    """(absolute http(s) URL without fragment, None) or (None, drop reason) for an image reference."""
    raw = raw.strip()
    if raw.lower().startswith("data:"):
        return None, "data_uri"
    if raw.startswith("//"):
        scheme = urlsplit(base).scheme if base else ""
        raw = f"{scheme if scheme in ('http', 'https') else 'https'}:{raw}"
    scheme = urlsplit(raw).scheme.lower() if ":" in raw[:12] else ""
    if not scheme:
        if base is None:
            return None, "unresolvable"
        raw = urljoin(base, raw)
        scheme = urlsplit(raw).scheme.lower()
    if scheme not in ("http", "https"):
        return None, "bad_scheme"
    parts = urlsplit(raw)
    if not parts.netloc:
        return None, "bad_scheme"
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path or "/", parts.query, "")), None


def _extension(url: str) -> str:
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _is_tracker(url: str, trackers: tuple[str, ...]) -> bool:
    """A host (or host + path prefix, ``facebook.com/tr``) of the list, or any subdomain of one."""
    parts = urlsplit(url)
    host, path = parts.netloc.lower().rsplit("@", 1)[-1].split(":", 1)[0], parts.path
    for tracker in trackers:
        t_host, _, t_path = tracker.partition("/")
        if (host == t_host or host.endswith("." + t_host)) and (not t_path or path.startswith("/" + t_path)):
            return True
    return False


def page_base(tree, page_url: str | None) -> str | None:
    """The URL relative references resolve against: ``<base href>`` over the page URL; a page stored under a
    non-http name (``urn:sample:...``) falls back to its canonical link or ``og:url``."""
    page = page_url if page_url and page_url.lower().startswith(("http://", "https://")) else None
    head = tree.head
    if head is None:
        return page
    if page is None:
        for selector, attr in (('link[rel="canonical"]', "href"), ('meta[property="og:url"]', "content")):
            node = head.query_selector(selector)
            value = (node.getattr(attr) or "").strip() if node is not None else ""
            if value.lower().startswith(("http://", "https://")):
                page = value
                break
    base = head.query_selector("base[href]")
    if base is not None:
        href = (base.getattr("href") or "").strip()
        if href.lower().startswith(("http://", "https://")):
            return href
        if href and page is not None:
            return urljoin(page, href)
    return page


def extract_page(html: bytes | str, page_url: str | None, options: ExtractOptions = ExtractOptions()) -> Page:
    """Walk one page in document order into text runs and images (see the module docstring)."""
    from resiliparse.parse.encoding import detect_encoding
    from resiliparse.parse.html import HTMLTree

    if isinstance(html, bytes):
        tree = HTMLTree.parse_from_bytes(html, detect_encoding(html))
    else:
        tree = HTMLTree.parse(html)
    walker = _Walker(options, page_base(tree, page_url))
    root = tree.body if tree.body is not None else tree.document
    walker.walk(root)
    return walker.page


_EXIT = object()
_MAIN_CONTENT = "main, article, h1, [role=main]"
_BREAK = "\x00"  # a <br>: the HTML parser never leaves a NUL in text
_NO_IMAGES_INSIDE = frozenset({"script", "style", "template", "title", "svg", "math", "head"})


class _Walker:
    """One page's walk: an explicit stack (deep DOMs would overflow recursion) of nodes and exit markers."""

    def __init__(self, options: ExtractOptions, base: str | None):
        from resiliparse.parse.html import NodeType

        self.options = options
        self.base = base
        self.page = Page()
        self.pieces: list[str] = []
        self.seen: set[str] = set()
        self.figures: list[dict] = []  # the open <figure>s: their caption and how many images they kept
        self.main_depth = 0  # open <article>/<main> elements: a <header> inside one is content
        self.ELEMENT, self.TEXT = NodeType.ELEMENT, NodeType.TEXT

    def flush(self) -> None:
        if self.pieces:
            lines = (normalise_space(line) for line in "".join(self.pieces).split(_BREAK))
            self.pieces.clear()
            text = "\n".join(line for line in lines if line)
            if text:
                self.page.add_text(text)

    def walk(self, root) -> None:
        stack: list = [root]
        while stack:
            node = stack.pop()
            if isinstance(node, tuple):  # (_EXIT, element tag, element)
                self.leave(node[1], node[2])
                continue
            kind = node.type
            if kind == self.TEXT:
                self.pieces.append(node.text)
                continue
            if kind != self.ELEMENT:
                continue
            tag = node.tag
            if self.skipped(node, tag):
                if tag not in _NO_IMAGES_INSIDE:
                    inside = 1 if tag == "img" else len(node.query_selector_all("img"))
                    self.page.img_tags += inside
                    self.page.dropped.extend([("boilerplate", None)] * inside)
                continue
            if tag == "img":
                self.image(node)
                continue
            if tag == "br":
                self.pieces.append(_BREAK)
                continue
            if tag in CELL_TAGS:
                self.pieces.append(" ")
            elif tag in BLOCK_TAGS:
                self.flush()
            if tag == "figure":
                self.figures.append({"caption": _figure_caption(node), "images": 0})
            elif tag in ("article", "main"):
                self.main_depth += 1
            stack.append((_EXIT, tag, node))
            child = node.last_child
            while child is not None:
                stack.append(child)
                child = child.prev

    def leave(self, tag: str, node) -> None:
        if tag in BLOCK_TAGS:
            self.flush()
        if tag == "figure":
            figure = self.figures.pop()
            if figure["images"] == 0 and figure["caption"]:  # no image kept: the caption is just text
                self.page.add_text(figure["caption"])
        elif tag in ("article", "main"):
            self.main_depth -= 1

    def skipped(self, node, tag: str) -> bool:
        if tag in SKIP_TAGS or (tag == "figcaption" and self.figures):
            return True
        if tag == "header" and self.main_depth == 0 and _is_site_header(node):
            return True
        if tag in ("body", "html", "main", "article"):
            return False
        if node.hasattr("hidden") or (node.getattr("aria-hidden") or "").lower() == "true":
            return True
        style = node.getattr("style")
        if style and _HIDDEN_STYLE.search(style):
            return True
        role = node.getattr("role")
        if role and role.strip().lower() in BOILERPLATE_ROLES:
            return not _holds_main_content(node)
        if self.options.boilerplate_classes and tag != "img":
            names = (node.getattr("class") or "").split()
            element_id = node.getattr("id")
            if element_id:
                names.append(element_id)
            if any(BOILERPLATE_NAME.match(name) for name in names):
                return not _holds_main_content(node)
        return False

    def image(self, node) -> None:
        page, options = self.page, self.options
        page.img_tags += 1
        srcsets = [node.getattr(a) for a in SRCSET_ATTRS]
        parent = node.parent
        if parent is not None and parent.type == self.ELEMENT and parent.tag == "picture":
            source = parent.first_child
            while source is not None:
                if source.type == self.ELEMENT and source.tag == "source":
                    srcsets.extend(source.getattr(a) for a in SRCSET_ATTRS)
                source = source.next
        raw = largest_srcset_candidate(", ".join(s for s in srcsets if s))
        if raw is None:
            srcs = [s.strip() for s in (*(node.getattr(a) for a in LAZY_SRC_ATTRS), node.getattr("src")) if s]
            srcs = [s for s in srcs if s]
            raw = next((s for s in srcs if not s.lower().startswith("data:")), None)
            if raw is None:
                page.dropped.append(("data_uri" if srcs else "no_src", None))
                return
        url, reason = resolve_url(raw, self.base)
        if reason is not None:
            page.dropped.append((reason, raw[:500]))
            return
        width, height = declared_size(node.getattr("width")), declared_size(node.getattr("height"))
        sides = [s for s in (width, height) if s is not None]
        if sides and min(sides) <= options.tracking_max_side:
            reason = "tracking_pixel"
        elif _is_tracker(url, options.tracker_hosts):
            reason = "tracker_host"
        elif _extension(url) in options.excluded_extensions:
            reason = "excluded_extension"
        elif sides and min(sides) < options.min_side:
            reason = "too_small"
        elif url in self.seen:
            reason = "repeated_in_page"
        if reason is not None:
            page.dropped.append((reason, url))
            return
        self.seen.add(url)
        self.flush()  # the text before the image is a run of its own
        caption = None
        if self.figures:
            self.figures[-1]["images"] += 1
            caption = self.figures[-1]["caption"] or None
        page.add_image(url, normalise_space(node.getattr("alt")) or None, caption, width, height)


def _holds_main_content(node) -> bool:
    # some sites wrap the whole page in a "navigation-container" or a role="banner" block
    return node.query_selector(_MAIN_CONTENT) is not None


def _is_site_header(header) -> bool:
    parent = header.parent
    return (parent is not None and parent.tag == "body") or header.query_selector("nav") is not None


def _figure_caption(figure) -> str:
    caption = figure.query_selector("figcaption")
    return normalise_space(caption.text) if caption is not None else ""


# --- side products of a finished run: image URL lists ---------------------------------------------------------

IMAGE_URL_LIST_SCHEMA = pa.schema([pa.field("url", pa.string()), pa.field("caption", pa.large_string()),
                                   pa.field("alt", pa.large_string()), pa.field("pages", pa.int64()),
                                   pa.field("page_url", pa.string()), pa.field("page_id", pa.string())])


def _run_rows(run_dir: Path) -> Iterator[dict]:
    """The documents of a finished run's ``data/`` shards, shard by shard (only the columns lists need)."""
    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if not manifest.exists() or not json.loads(manifest.read_text()).get("complete"):
        raise ValueError(f"{run_dir} is not a finished phi3data run (no complete manifest.json): run "
                         f"`phi3data run pipelines/interleaved.toml --output {run_dir}` to the end first")
    columns = ["id", "url", "image_urls", "alts", "captions"]
    shards = sorted((run_dir / "data").glob("*.parquet"))
    for path in shards:
        names = pq.read_schema(path).names
        if "image_urls" not in names:
            raise ValueError(f"{path} has no image_urls column: not the output of an extract_interleaved recipe")
        yield from pq.read_table(path, columns=columns).to_pylist()
    for path in sorted((run_dir / "data").glob("*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if "image_urls" not in row:
                    raise ValueError(f"{path} has no image_urls: not the output of an extract_interleaved recipe")
                yield {name: row.get(name) for name in columns}


def image_url_list(run_dir: Path, *, captioned_only: bool = False) -> pa.Table:
    """The distinct image URLs of a finished interleaved run, sorted by URL (``IMAGE_URL_LIST_SCHEMA``).

    ``caption`` is the figure caption, else the alt text, of the URL's first occurrence that has one (pages in
    id order, positions in page order); ``pages`` counts the pages holding the URL. ``captioned_only`` keeps only
    URLs with a caption (the alt-text pairs). ``phi3data fetch`` reads the ``url`` and ``caption`` columns."""
    found: dict[str, dict] = {}
    rows = sorted(_run_rows(run_dir), key=lambda r: r["id"])
    for row in rows:
        on_page = set()
        for url, alt, caption in zip(row["image_urls"] or [], row["alts"] or [], row["captions"] or []):
            if url is None:
                continue
            entry = found.setdefault(url, {"url": url, "caption": None, "alt": None, "pages": 0,
                                           "page_url": row["url"], "page_id": row["id"]})
            if url not in on_page:
                entry["pages"] += 1
                on_page.add(url)
            if entry["caption"] is None and (caption or alt):
                entry.update(caption=caption or alt, alt=alt)
    entries = [found[u] for u in sorted(found) if not captioned_only or found[u]["caption"] is not None]
    return pa.Table.from_pylist(entries, schema=IMAGE_URL_LIST_SCHEMA)


def alt_text_pairs(run_dir: Path) -> pa.Table:
    """Image URL + caption (figure caption, else alt text) pairs of a finished run as a ``URL_SCHEMA`` table:
    the keys are positions in URL order (as :func:`phi3data.multimodal.readers.read_url_list` names them) and
    ``source`` is the page the caption came from."""
    listed = image_url_list(run_dir, captioned_only=True)
    return make_urls({"key": f"{i:09d}", "url": url, "text": caption, "source": page}
                     for i, (url, caption, page) in enumerate(zip(listed.column("url").to_pylist(),
                                                                  listed.column("caption").to_pylist(),
                                                                  listed.column("page_url").to_pylist())))


def write_image_url_list(run_dir: Path, path: Path, *, captioned_only: bool = False) -> int:
    """Write :func:`image_url_list` to ``path`` (``.parquet`` or ``.jsonl``) atomically; returns the row count."""
    table = image_url_list(run_dir, captioned_only=captioned_only)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        if path.suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as handle:
                for row in table.to_pylist():
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif path.suffix == ".parquet":
            pq.write_table(table, tmp, compression="zstd")
        else:
            raise ValueError(f"{path}: write the URL list as .parquet or .jsonl")
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return table.num_rows
