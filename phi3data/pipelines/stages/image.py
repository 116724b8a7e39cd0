"""Image stages for image-text records: decode and verify, size and aspect bounds, resize / pad-to-square, and
exact + perceptual-hash near-duplicate removal.

They work on tables with an ``image`` bytes column (image and pair records) and, except dedup, on tables with an
``images`` list column (conversations, interleaved documents; null entries are text positions): such a record is
dropped when any of its images fails, under that image's reason. A bad image is bad input: it is counted under
``<stage>:<reason>`` and written to the run's rejects with the first bytes of the image.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pydantic import Field, model_validator

from phi3data.multimodal import images as img
from phi3data.multimodal.records import image_id, pair_id
from phi3data.pipelines.base import KeyedStage, Stage, StageOutput, StageParams, register, set_column
from phi3data.pipelines.shuffle import (
    EDGE_SCHEMA,
    KEYS_SCHEMA,
    ShuffleJob,
    components_on_driver,
    read_part,
    resolved_rows,
    write_parquet_hashed,
)

EXCERPT_BYTES = 256
BAD_INPUT = {"truncated", "undecodable", "decompression_bomb", "unsupported_format", "image_error"}
"""Reasons that mean broken input: also written to the run's rejects (bounds like ``too_small`` are only counted)."""


def image_layout(batch: pa.Table) -> str:
    """``single`` for tables with an ``image`` column, ``list`` for an ``images`` column."""
    if "image" in batch.column_names:
        return "single"
    if "images" in batch.column_names:
        return "list"
    raise ValueError(f"an image stage needs an 'image' or 'images' column; this table has {batch.column_names}")


class _DecodeParams(StageParams):
    max_pixels: int = Field(img.DEFAULT_MAX_PIXELS, gt=0)
    """More pixels than this (read from the header, before decoding) is a ``decompression_bomb``. Pillow itself
    refuses more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` (179 Mpx); a higher limit needs that raised too."""
    formats: list[str] = list(img.DEFAULT_FORMATS)
    """Pillow format names accepted; others are ``unsupported_format``."""


class _PerImageStage(Stage):
    """Runs ``transform`` on every image of every record; a failing image drops its record with the reason."""

    params: _DecodeParams

    def __init__(self, params: StageParams, name: str | None = None):
        img.require_pillow(self.type_name)
        super().__init__(params, name)

    def transform(self, data: bytes) -> dict:
        """What the stage makes of one image (a dict of values); raise ImageRejected to drop it."""
        raise NotImplementedError

    def _one(self, data: bytes) -> dict:
        try:
            return self.transform(data)
        except img.ImageRejected as exc:
            exc.data = data
            raise
        except Exception as exc:  # an image Pillow opens but cannot convert or resize is bad input too
            rejected = img.ImageRejected("image_error", f"{type(exc).__name__}: {exc}"[:200])
            rejected.data = data
            raise rejected from None

    def finish(self, batch: pa.Table, layout: str, results: list) -> pa.Table:
        """Write the kept records' results into the batch (``results[i]``: a dict, or a list of dicts or None)."""
        return batch

    def process(self, batch: pa.Table) -> StageOutput:
        if batch.num_rows == 0:
            return StageOutput(self.finish(batch, image_layout(batch), []))
        layout = image_layout(batch)
        column = batch.column("image" if layout == "single" else "images").to_pylist()
        ids = batch.column("id").to_pylist() if "id" in batch.column_names else [None] * batch.num_rows
        sources = batch.column("source").to_pylist() if "source" in batch.column_names else [None] * batch.num_rows
        keep, results, rejects = [], [], []
        drops: Counter = Counter()
        for doc, source, value in zip(ids, sources, column):
            items = [value] if layout == "single" else list(value or [])
            try:
                out = [None if data is None and layout == "list" else self._one(data) for data in items]
            except img.ImageRejected as exc:
                keep.append(False)
                drops[f"{self.name}:{exc.reason}"] += 1
                if exc.reason in BAD_INPUT:
                    rejects.append({"id": doc, "source": source, "stage": self.name, "reason": exc.reason,
                                    "detail": exc.detail, "excerpt": (exc.data or b"")[:EXCERPT_BYTES]})
                continue
            keep.append(True)
            results.append(out[0] if layout == "single" else out)
        if drops:
            batch = batch.filter(pa.array(keep, pa.bool_()))
        return StageOutput(self.finish(batch, layout, results), drops, rejects)


# --- decode ---------------------------------------------------------------------------------------------------


class ImageDecodeParams(_DecodeParams):
    phash: bool = False
    """Also add ``phash`` (the 64-bit DCT perceptual hash, as int64 bits) from the pixels decoded here, so
    ``image_dedup`` does not decode the image again."""


@register
class ImageDecode(_PerImageStage):
    """Verify every image decodes; drop ``truncated``, ``undecodable``, ``decompression_bomb`` and
    ``unsupported_format`` ones. Adds ``width``, ``height`` and ``image_format`` (for lists of images:
    ``widths``, ``heights``, ``image_formats``, null at text positions), and ``phash`` when asked."""

    type_name = "image_decode"
    Params = ImageDecodeParams
    params: ImageDecodeParams

    def transform(self, data: bytes) -> dict:
        p = self.params
        header = img.open_image(data, max_pixels=p.max_pixels, formats=tuple(p.formats))
        width, height = header.size
        # without a pHash to compute, a JPEG decodes at 1/8 scale: every coefficient is still read, so damage is
        # still found, at a fraction of the cost
        draft = None if p.phash else (max(1, width // 8), max(1, height // 8))
        decoded = img.decode_image(data, max_pixels=p.max_pixels, formats=tuple(p.formats), draft=draft)
        out = {"width": width, "height": height, "image_format": decoded.format}
        if p.phash:
            out["phash"] = img.phash(decoded)
        return out

    def finish(self, batch: pa.Table, layout: str, results: list) -> pa.Table:
        batch = add_size_columns(batch, layout, results)
        if self.params.phash:
            if layout == "single":
                values = [as_int64(r["phash"]) for r in results]
                batch = set_column(batch, "phash", pa.array(values, pa.int64()))
            else:
                values = [[None if r is None else as_int64(r["phash"]) for r in rs] for rs in results]
                batch = set_column(batch, "phashes", pa.array(values, pa.list_(pa.int64())))
        return batch


def as_int64(value: int) -> int:
    """A 64-bit hash as a signed int64 (same bits: Parquet readers everywhere handle int64, not all uint64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def add_size_columns(batch: pa.Table, layout: str, results: list) -> pa.Table:
    """Set ``width``/``height``/``image_format`` (or their list forms) from per-image result dicts."""
    if layout == "single":
        return _set(batch, {"width": (pa.int32(), [r["width"] for r in results]),
                            "height": (pa.int32(), [r["height"] for r in results]),
                            "image_format": (pa.string(), [r["image_format"] for r in results])})

    def per(key):
        return [[None if r is None else r[key] for r in rs] for rs in results]

    return _set(batch, {"widths": (pa.list_(pa.int32()), per("width")),
                        "heights": (pa.list_(pa.int32()), per("height")),
                        "image_formats": (pa.list_(pa.string()), per("image_format"))})


def _set(batch: pa.Table, columns: dict[str, tuple[pa.DataType, list]]) -> pa.Table:
    for name, (kind, values) in columns.items():
        batch = set_column(batch, name, pa.array(values, kind))
    return batch


# --- size -----------------------------------------------------------------------------------------------------

# DataComp's basic filtering (Gadre et al. 2023, sec. 3.4 / "basic" baseline): drop images whose smaller side is
# under 200 px or whose aspect ratio exceeds 3 (either way). OBELICS (Laurencon et al. 2023, sec. 3.3 and
# appendix A.2.1): keep images with both sides between 150 and 20,000 px and aspect ratio between 1/2 and 2.
SIZE_PRESETS = {
    "datacomp": {"min_side": 200, "max_aspect": 3.0, "min_aspect": 1 / 3},
    "obelics": {"min_side": 150, "max_side": 20_000, "max_aspect": 2.0, "min_aspect": 0.5},
}


class ImageSizeParams(_DecodeParams):
    preset: Literal["datacomp", "obelics"] | None = None
    """Fill the bounds a project uses; bounds set explicitly win over the preset's."""
    min_side: int | None = Field(None, ge=1)
    max_side: int | None = Field(None, ge=1)
    min_aspect: float | None = Field(None, gt=0)
    """Smallest width / height (1/3: three times taller than wide)."""
    max_aspect: float | None = Field(None, gt=0)
    """Largest width / height."""

    @model_validator(mode="after")
    def _fill_preset(self):
        for key, value in SIZE_PRESETS.get(self.preset, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self


@register
class ImageSize(_PerImageStage):
    """Drop images outside side-length and aspect-ratio bounds: ``too_small``, ``too_large``, ``too_wide``,
    ``too_tall``. Reads ``width``/``height`` from ``image_decode`` when present, else the image header."""

    type_name = "image_size"
    Params = ImageSizeParams
    params: ImageSizeParams

    def check(self, width: int, height: int) -> None:
        p = self.params
        if p.min_side is not None and min(width, height) < p.min_side:
            raise img.ImageRejected("too_small", f"{width}x{height}, smaller side under {p.min_side}")
        if p.max_side is not None and max(width, height) > p.max_side:
            raise img.ImageRejected("too_large", f"{width}x{height}, larger side over {p.max_side}")
        if p.max_aspect is not None and width / height > p.max_aspect:
            raise img.ImageRejected("too_wide", f"{width}x{height}, aspect over {p.max_aspect:.3g}")
        if p.min_aspect is not None and width / height < p.min_aspect:
            raise img.ImageRejected("too_tall", f"{width}x{height}, aspect under {p.min_aspect:.3g}")

    def transform(self, data: bytes) -> dict:
        width, height = img.open_image(data, max_pixels=self.params.max_pixels,
                                       formats=tuple(self.params.formats)).size
        self.check(width, height)
        return {}

    def process(self, batch: pa.Table) -> StageOutput:
        if batch.num_rows == 0 or not {"width", "height"} <= set(batch.column_names):
            return super().process(batch)
        drops: Counter = Counter()
        keep = []
        for width, height in zip(batch.column("width").to_pylist(), batch.column("height").to_pylist()):
            try:
                self.check(width, height)
                keep.append(True)
            except img.ImageRejected as exc:
                keep.append(False)
                drops[f"{self.name}:{exc.reason}"] += 1
        return StageOutput(batch.filter(pa.array(keep, pa.bool_())) if drops else batch, drops)


# --- resize ---------------------------------------------------------------------------------------------------


class ImageResizeParams(_DecodeParams):
    mode: Literal["pad", "shorter_side", "center_crop"] = "pad"
    """pad: LLaVA's pad-to-square then resize to ``size`` x ``size``; shorter_side: the shorter side becomes
    ``size``; center_crop: shorter side, then the centre square (CLIP's preprocessing)."""
    size: int = Field(336, gt=0)
    background: Literal["clip_mean", "mean"] | tuple[int, int, int] = "clip_mean"
    """Padding colour: LLaVA's (the CLIP processor's image_mean x 255), the image's own mean, or an RGB triple."""
    resample: Literal["bicubic", "bilinear", "lanczos", "box"] = "bicubic"
    upscale: bool = True
    """Enlarge images smaller than ``size`` (LLaVA does); off keeps them at their size."""
    format: Literal["jpeg", "png", "webp"] = "jpeg"
    quality: int = Field(95, ge=0, le=100)
    """JPEG/WebP quality; for PNG the zlib level (0-9)."""
    draft: bool = True
    """Decode JPEGs at the smallest DCT scale still at least the target size (what Pillow's ``thumbnail``
    does): far faster for large photos, pixels within a few levels of a full decode."""


@register
class ImageResize(_PerImageStage):
    """Resize (and pad or crop) every image and re-encode it. The image gets a new id from its new bytes (pairs
    a new pair id too); the id it had on input is kept in ``original_image_id`` (``original_image_ids``)."""

    type_name = "image_resize"
    Params = ImageResizeParams
    params: ImageResizeParams

    def transform(self, data: bytes) -> dict:
        p = self.params
        formats = tuple(p.formats)
        draft = None
        if p.draft:
            width, height = img.open_image(data, max_pixels=p.max_pixels, formats=formats).size
            side = max(width, height) if p.mode == "pad" else min(width, height)
            scale = min(1.0, p.size / side)
            draft = (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
        image = img.to_rgb(img.decode_image(data, max_pixels=p.max_pixels, formats=formats, draft=draft))
        if p.mode == "pad":
            background = img.CLIP_MEAN_RGB if p.background == "clip_mean" else p.background
            image = img.pad_to_square(image, background, size=p.size, resample=p.resample, upscale=p.upscale)
        else:
            image = img.resize_shorter(image, p.size, p.resample, p.upscale)
            if p.mode == "center_crop":
                image = img.center_crop(image, p.size)
        out = img.encode_image(image, p.format, p.quality)
        return {"image": out, "width": image.width, "height": image.height,
                "image_format": img.ENCODE_FORMATS[p.format]}

    def finish(self, batch: pa.Table, layout: str, results: list) -> pa.Table:
        # records carry their images' content ids (pairs: image_id; images: id; lists: image_ids): the originals
        if layout == "single":
            originals = batch.column("image_id" if "image_id" in batch.column_names else "id").to_pylist()
            if "original_image_id" in batch.column_names:  # resized before: keep the first input's id
                originals = [o or r for o, r in zip(batch.column("original_image_id").to_pylist(), originals)]
            new_ids = [image_id(r["image"]) for r in results]
            batch = set_column(batch, "image", pa.array([r["image"] for r in results], pa.large_binary()))
            if "image_id" in batch.column_names:  # a pair: image id, and the pair id derived from it
                texts = batch.column("text").to_pylist()
                batch = set_column(batch, "image_id", pa.array(new_ids, pa.string()))
                new_ids = [pair_id(i, t) for i, t in zip(new_ids, texts)]
            batch = set_column(batch, "id", pa.array(new_ids, pa.string()))
            batch = set_column(batch, "original_image_id", pa.array(originals, pa.string()))
        else:
            originals = batch.column("image_ids").to_pylist()
            if "original_image_ids" in batch.column_names:
                originals = [[o or r for o, r in zip(olds or [], news)] if olds else news
                             for olds, news in zip(batch.column("original_image_ids").to_pylist(), originals)]
            images = [[None if r is None else r["image"] for r in rs] for rs in results]
            batch = set_column(batch, "images", pa.array(images, pa.list_(pa.large_binary())))
            batch = set_column(batch, "image_ids", pa.array(
                [[None if b is None else image_id(b) for b in bs] for bs in images], pa.list_(pa.string())))
            batch = set_column(batch, "original_image_ids", pa.array(originals, pa.list_(pa.string())))
        names = ("width", "height", "image_format") if layout == "single" else ("widths", "heights", "image_formats")
        if any(n in batch.column_names for n in names):
            batch = add_size_columns(batch, layout, results)
        return batch


# --- dedup ----------------------------------------------------------------------------------------------------

# The shuffle's key rows carry only (band, key, node), and a node is named by the id keys() returns. So an image's
# "id" there is a label: 15 digits of (10**15 - 1 - pixels), the record id, LABEL_SEP, the hash in hex. Labels sort
# largest image first, then by record id, which makes the smallest node of a cluster the image to keep, and the
# reduce tasks read the hash from the label to check the real Hamming distance.
LABEL_SEP = "\x1e"  # below every printable character, so "<id><SEP>" sorts as the id does
PIXEL_DIGITS = 15


class ImageDedupParams(_DecodeParams):
    method: Literal["phash", "exact"] = "phash"
    """phash: 64-bit DCT perceptual hashes within ``threshold`` bits are duplicates; exact: identical bytes."""
    threshold: int = Field(4, ge=0, le=15)
    """Largest Hamming distance between two pHashes that makes them duplicates."""
    mode: Literal["keep_one", "annotate"] = "keep_one"
    """keep_one: keep each cluster's first image (most pixels, then smallest id); annotate: keep all and add
    ``dup_cluster`` (the kept image's record id) and ``dup_cluster_size``."""
    partitions: int = Field(16, gt=0, le=65536)
    """Key partitions (reduce tasks); changes the work layout, not the result."""


@register
class ImageDedup(KeyedStage):
    """Exact and perceptual-hash near-duplicate images, identical on every engine.

    Keys: the pHash is cut into ``threshold + 1`` bands; two hashes within ``threshold`` bits agree on at least one
    band (pigeonhole), so each band's bits are a key and candidates meet in one key partition, where their real
    Hamming distance is checked. Linked images form clusters (connected components); each cluster keeps its
    largest image (most pixels), ties going to the smallest record id, and every dropped record gets a finding
    naming the record kept. Records whose image does not decode get no key and are kept (decode first)."""

    type_name = "image_dedup"
    Params = ImageDedupParams
    params: ImageDedupParams

    def __init__(self, params: StageParams, name: str | None = None):
        img.require_pillow(self.type_name)
        super().__init__(params, name)

    def bands(self) -> list[tuple[int, int]]:
        """(shift, width) of each band of the 64-bit hash."""
        count = self.params.threshold + 1 if self.params.method == "phash" else 1
        edges = [round(i * 64 / count) for i in range(count + 1)]
        return [(64 - hi, hi - lo) for lo, hi in zip(edges, edges[1:])]

    def keys(self, batch: pa.Table) -> pa.Table:
        if image_layout(batch) != "single":
            raise ValueError(f"{self.name}: image_dedup works on image and pair records (an 'image' column)")
        p = self.params
        sizes = (zip(batch.column("width").to_pylist(), batch.column("height").to_pylist())
                 if {"width", "height"} <= set(batch.column_names) else None)
        known = iter(batch.column("phash").to_pylist()) if "phash" in batch.column_names else None
        # pairs carry their image's content id; image records are named by it
        content_ids = batch.column("image_id" if "image_id" in batch.column_names else "id").to_pylist()
        images = batch.column("image")  # read one by one, only where an image must be opened
        bands, keys, labels = [], [], []
        for row, doc in enumerate(batch.column("id").to_pylist()):
            size = next(sizes) if sizes is not None else None
            value = next(known) if known is not None else None
            try:
                if p.method == "phash":
                    if value is None or size is None:  # not hashed by image_decode: decode here
                        image = img.decode_image(images[row].as_py(), max_pixels=p.max_pixels,
                                                 formats=tuple(p.formats))
                        size, value = image.size, img.phash(image)
                    value &= (1 << 64) - 1
                    digest = f"{value:016x}"
                else:
                    size = size or img.open_image(images[row].as_py(), max_pixels=p.max_pixels,
                                                  formats=tuple(p.formats)).size
                    digest = content_ids[row]
                    value = int(digest[:16], 16)
            except img.ImageRejected:
                continue
            label = f"{max(0, 10 ** PIXEL_DIGITS - 1 - size[0] * size[1]):0{PIXEL_DIGITS}d}{doc}{LABEL_SEP}{digest}"
            for band, (shift, width) in enumerate(self.bands()):
                chunk = (value >> shift) & ((1 << width) - 1)
                bands.append(band)
                keys.append(xxhash.xxh64_intdigest(f"{band}:{chunk}"))
                labels.append(label)
        return pa.table({"band": pa.array(bands, pa.int16()), "key": pa.array(keys, pa.uint64()),
                         "id": pa.array(labels, pa.string())})

    def resolve(self, job: ShuffleJob) -> dict:
        p = self.params
        keys_files = [str(f) for f in job.keys_files]
        reduced = job.run("image_links", functools.partial(_link_candidates, keys_files, str(job.work / "links"),
                                                           p.method, p.threshold),
                          [{"task": f"p{q:05d}", "part": q} for q in range(p.partitions)])
        edge_files = [f for r in reduced for f in r["files"]]
        clusters = components_on_driver(edge_files)
        # a pair close in several bands is linked once per band's partition: count distinct pairs
        edges = pa.concat_tables([pq.read_table(f) for f in edge_files]) if edge_files else EDGE_SCHEMA.empty_table()
        links = edges.group_by(["src", "dst"]).aggregate([]).num_rows if edges.num_rows else 0
        rows = resolved_rows(clusters)
        labels, reps = rows.column("id").to_pylist(), rows.column("cluster").to_pylist()
        distances = [_distance(a, b, p.method) for a, b in zip(labels, reps)]
        resolved = pa.table({"shard": rows.column("shard"),
                             "id": pa.array([_doc_of(x) for x in labels], pa.string()),
                             "cluster": pa.array([_doc_of(x) for x in reps], pa.string()),
                             "size": rows.column("size"), "distance": pa.array(distances, pa.int32())})
        resolved = resolved.sort_by([("shard", "ascending"), ("id", "ascending")])
        path = job.work / "resolved.parquet"
        files = {job.relative(path): write_parquet_hashed(resolved, path, row_group_size=65536)}
        dropped = int(pc.sum(pc.not_equal(resolved.column("id"), resolved.column("cluster"))).as_py() or 0)
        return {"images_keyed": sum(pq.read_table(f, columns=["band"], filters=[("band", "=", 0)]).num_rows
                                    for f in keys_files),
                "comparisons": sum(r["candidates"] for r in reduced), "links": links,
                "clusters": int(pc.count_distinct(resolved.column("cluster")).as_py()) if resolved.num_rows else 0,
                "in_clusters": resolved.num_rows, "to_drop": 0 if p.mode == "annotate" else dropped,
                "resolved": files}

    def apply_resolved(self, batch: pa.Table, decision: dict, resolved: pa.Table) -> StageOutput:
        clusters = dict(zip(resolved.column("id").to_pylist(),
                            zip(resolved.column("cluster").to_pylist(), resolved.column("size").to_pylist(),
                                resolved.column("distance").to_pylist())))
        ids = batch.column("id").to_pylist()
        if self.params.mode == "annotate":
            reps = [clusters.get(doc, (doc, 1, 0)) for doc in ids]
            batch = set_column(batch, "dup_cluster", pa.array([r[0] for r in reps], pa.string()))
            return StageOutput(set_column(batch, "dup_cluster_size", pa.array([r[1] for r in reps], pa.int64())))
        keep, findings = [], []
        drops: Counter = Counter()
        for doc in ids:
            entry = clusters.get(doc)
            duplicate = entry is not None and entry[0] != doc
            keep.append(not duplicate)
            if duplicate:
                drops[f"{self.name}:duplicate"] += 1
                findings.append({"id": doc, "kind": "duplicate", "kept": entry[0], "size": entry[1],
                                 "distance": entry[2]})
        if drops:
            batch = batch.filter(pa.array(keep, pa.bool_()))
        return StageOutput(batch, drops, findings=findings)


def _doc_of(label: str) -> str:
    return label[PIXEL_DIGITS:].rpartition(LABEL_SEP)[0]


def _digest_of(label: str) -> str:
    return label.rpartition(LABEL_SEP)[2]


def _distance(a: str, b: str, method: str) -> int:
    da, db = _digest_of(a), _digest_of(b)
    if method == "exact":
        return 0 if da == db else -1
    return img.hamming(int(da, 16), int(db, 16))


def _link_candidates(keys_files: list[str], out: str, method: str, threshold: int, item: dict) -> dict:
    """One key partition: images sharing a band key are candidates; link the pairs really within ``threshold``
    bits (exact: equal digests), each node to the smallest node it matches. Writes the links as edges."""
    part = item["part"]
    table = read_part(keys_files, part, ["band", "key", "node"], KEYS_SCHEMA)
    groups = table.group_by(["band", "key"]).aggregate([("node", "list")])
    src, dst, candidates = [], [], 0
    for nodes in groups.column("node_list").to_pylist():
        nodes = sorted(set(nodes))
        if len(nodes) < 2:
            continue
        by_digest: dict[str, list[str]] = {}
        for node in nodes:
            by_digest.setdefault(_digest_of(node.rpartition("\x1f")[0]), []).append(node)
        digests = sorted(by_digest, key=lambda d: by_digest[d][0])
        for same in by_digest.values():  # identical hashes: all linked to the first, no comparisons
            src.extend([same[0]] * (len(same) - 1))
            dst.extend(same[1:])
        if method == "phash":
            values = [int(d, 16) for d in digests]
            for i in range(len(digests)):
                for j in range(i + 1, len(digests)):
                    candidates += 1
                    if img.hamming(values[i], values[j]) <= threshold:
                        src.append(by_digest[digests[i]][0])
                        dst.append(by_digest[digests[j]][0])
    edges = pa.table({"src": pa.array(src, pa.string()), "dst": pa.array(dst, pa.string())}, schema=EDGE_SCHEMA)
    edges = edges.group_by(["src", "dst"]).aggregate([]).select(["src", "dst"]) if edges.num_rows else edges
    path = Path(out) / f"{item['task']}.parquet"
    return {"task": item["task"], "files": {str(path): write_parquet_hashed(edges, path)},
            "candidates": candidates, "links": edges.num_rows}
