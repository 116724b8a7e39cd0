"""Image helpers shared by the image stages and the benchmark: checked decoding, pHash, LLaVA's pad-to-square,
resizing and re-encoding. Everything works on bytes in, bytes (or numbers) out, with Pillow."""

from __future__ import annotations

import io
import warnings

import numpy as np

try:
    from PIL import Image
except ImportError:  # a core install still registers the image stages; opening an image says what to install
    Image = None

# Pillow format names the stages accept by default (what img2dataset and OBELICS keep, plus GIF/BMP/TIFF).
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default for Image.MAX_IMAGE_PIXELS
# LLaVA pads with the CLIP processor's normalisation mean (image_mean * 255), not with the image's own colours.
CLIP_MEAN_RGB = (122, 116, 104)
ENCODE_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Shrinking by more than this factor first averages whole pixel blocks (Image.reduce), then resamples the last 2x
# or more: close to resampling all the way (Pillow: 3.0 is indistinguishable), at a fraction of the cost for big
# photos, and still finer than the plain block average (cv2 INTER_AREA) img2dataset shrinks with.
REDUCING_GAP = 2.0
RESAMPLING = ("bicubic", "bilinear", "lanczos", "box")  # names of Pillow's Image.Resampling filters

PHASH_SIZE = 8
PHASH_SAMPLE = 32
# DCT-II basis rows for the 8 lowest frequencies of a 32-sample signal (scipy's unnormalised dct up to a factor
# of 2, which does not change which coefficients lie above the median).
_DCT = np.cos(np.pi * np.arange(PHASH_SIZE)[:, None] * (2 * np.arange(PHASH_SAMPLE)[None, :] + 1)
              / (2 * PHASH_SAMPLE))
_BIT_WEIGHTS = np.left_shift(np.uint64(1), np.arange(63, -1, -1, dtype=np.uint64))


class ImageRejected(Exception):
    """An image that fails a check, with the drop reason (``truncated``, ``undecodable`` ...) and a detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.data: bytes | None = None


def require_pillow(stage: str) -> None:
    """Fail at recipe load, naming the extra to install, when Pillow is absent (a core install)."""
    if Image is None:
        raise RuntimeError(f"{stage} needs Pillow: pip install 'phi3data[multimodal]'")


def open_image(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               formats: tuple[str, ...] = DEFAULT_FORMATS) -> Image.Image:
    """Open an image from its header only; raise :class:`ImageRejected` for a non-image, a format outside
    ``formats`` or more than ``max_pixels`` pixels (checked before any pixel is decoded)."""
    if not data:
        raise ImageRejected("undecodable", "no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)[:200]) from None
    except Exception as exc:  # Pillow raises many types for garbage: all are bad input
        raise ImageRejected("undecodable", f"{type(exc).__name__}: {exc}"[:200]) from None
    if image.format not in formats:
        raise ImageRejected("unsupported_format", f"{image.format} (accepted: {', '.join(formats)})")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("decompression_bomb", f"{width}x{height} is over {max_pixels} pixels")
    if width < 1 or height < 1:
        raise ImageRejected("undecodable", f"{width}x{height}")
    return image


def decode_image(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] = DEFAULT_FORMATS, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode an image, raising :class:`ImageRejected` (``truncated``, ``undecodable`` ...).

    ``draft`` lets a JPEG decode at a reduced scale no smaller than that size (libjpeg's DCT scaling): every
    coefficient is still read, so truncation and corrupt data are still found, at a fraction of the cost."""
    image = open_image(data, max_pixels=max_pixels, formats=formats)
    try:
        if draft is not None and image.format == "JPEG":
            image.draft("RGB", draft)
        image.load()
    except (EOFError, OSError, SyntaxError, ValueError) as exc:
        message = str(exc)
        reason = "truncated" if isinstance(exc, EOFError) or "truncat" in message.lower() else "undecodable"
        raise ImageRejected(reason, f"{type(exc).__name__}: {message}"[:200]) from None
    except Exception as exc:
        raise ImageRejected("undecodable", f"{type(exc).__name__}: {exc}"[:200]) from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparent areas become white (as img2dataset's alpha matting)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def phash(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash: greyscale, 32x32 Lanczos, 2-D DCT, the 8x8 lowest frequencies compared to
    their median; bit 63 is coefficient (0, 0), row-major, so ``phash(img) == int(str(imagehash.phash(img)), 16)``."""
    pixels = np.asarray(image.convert("L").resize((PHASH_SAMPLE, PHASH_SAMPLE), Image.Resampling.LANCZOS),
                        dtype=np.float64)
    low = _DCT @ pixels @ _DCT.T
    bits = (low > np.median(low)).reshape(-1)
    return int(_BIT_WEIGHTS[bits].sum())


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes."""
    return (a ^ b).bit_count()


def pad_to_square(image: Image.Image, background: tuple[int, int, int] | str = CLIP_MEAN_RGB, *,
                  size: int | None = None, resample: str = "bicubic", upscale: bool = True) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square of ``background`` (an RGB triple, or ``"mean"`` for
    the image's own mean colour); with ``size``, a ``size`` x ``size`` square.

    The image is scaled before it is padded (LLaVA pads, then its processor scales the square): the same
    picture, without resampling the padding, which is most of the work for a long panorama."""
    image = to_rgb(image)
    if background == "mean":
        background = tuple(int(round(v)) for v in np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0))
    width, height = image.size
    side = max(width, height)
    if size is not None and (side > size or upscale):
        scale = size / side
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                             Image.Resampling[resample.upper()], reducing_gap=REDUCING_GAP)
        width, height, side = *image.size, size
    if width == height == side:
        return image
    square = Image.new("RGB", (side, side), tuple(background))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def resize_shorter(image: Image.Image, size: int, resample: str = "bicubic", upscale: bool = True) -> Image.Image:
    """Resize so the shorter side is ``size`` (kept as is when smaller and ``upscale`` is off)."""
    width, height = image.size
    short = min(width, height)
    if short == size or (short < size and not upscale):
        return image
    scale = size / short
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, Image.Resampling[resample.upper()], reducing_gap=REDUCING_GAP)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre ``size`` x ``size`` square (or less along a side that is shorter)."""
    width, height = image.size
    crop_w, crop_h = min(size, width), min(size, height)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def encode_image(image: Image.Image, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode as ``jpeg``, ``png`` or ``webp``; ``quality`` is JPEG/WebP quality (PNG: zlib level 0-9)."""
    out = io.BytesIO()
    pil_format = ENCODE_FORMATS[fmt]
    if pil_format == "PNG":
        image.save(out, "PNG", compress_level=min(quality, 9))
    else:
        image = to_rgb(image) if pil_format == "JPEG" else image
        image.save(out, pil_format, quality=quality)
    return out.getvalue()
