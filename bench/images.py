"""Image stages: decode + size filter + pHash + resize, images/s on one core, phi3data vs img2dataset.

One run, on the same in-memory images (scikit-image's and scikit-learn's packaged photos, cropped, scaled and
re-encoded with a fixed seed into ``--images`` varied JPEGs and PNGs, 120 to 1,600 px a side):

  1. phi3data: the stages of ``pipelines/image_pairs.toml`` on pair tables of 64 rows: ``image_decode`` (with
     ``phash = true``) -> ``image_size`` (DataComp preset) -> the keys of ``image_dedup`` -> ``image_resize``
     (LLaVA's pad-to-square, 336 px, JPEG q95); the pair tables are built before the clock starts (a reader's
     work: img2dataset's resizer is handed bytes too);
  2. img2dataset's ``Resizer`` (cv2 decode, DataComp's min side 200 and aspect 3, ``border`` mode at 336 px, JPEG
     q95) plus ``imagehash.phash`` for the pHash it does not compute (on a Pillow decode);
  3. a plain Pillow loop doing the same work (open, load, size check, imagehash.phash, expand2square, resize,
     JPEG q95): the floor of doing it in Python with Pillow.

The three alternate for ``--rounds`` rounds (their order rotating); the median of each is reported, with the
ratio to img2dataset. Everything runs in this process on one thread (cv2.setNumThreads(1), as img2dataset sets).

img2dataset 1.47's dependencies would downgrade this project's pandas pin (3.1.1 -> 2.3.3) and add a second
OpenCV wheel, so it is not installed into the venv; its resizer runs from a side folder:

    pip install --no-deps --target /tmp/i2d_side img2dataset==1.47.0 albumentations==1.4.24 albucore==0.0.23 \\
        simsimd==6.5.16 stringzilla==5.3.2
    IMG2DATASET_PATH=/tmp/i2d_side python -m bench.images [--images 2000] [--rounds 3]

Only ``img2dataset/resizer.py`` is loaded (the package's ``__init__`` imports wandb and fire).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

SIZE, MIN_SIDE, MAX_ASPECT = 336, 200, 3.0
BATCH = 64


def source_photos() -> list[Image.Image]:
    """The packaged photos (RGB or greyscale, at least 300 px a side)."""
    import skimage
    from sklearn.datasets import load_sample_images

    folder = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
             "camera.png", "retina.jpg", "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png",
             "motorcycle_left.png", "color.png", "page.png"]
    photos = [Image.open(folder / n) for n in names]
    photos += [Image.open(f) for f in load_sample_images().filenames]
    return [p.convert("RGB") if p.mode not in ("RGB", "L") else p.copy() for p in photos]


def varied_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` encoded images: random crops of the photos scaled to 120-1,600 px sides, 80% JPEG (quality
    70-95), 20% PNG. About one in ten ends up under DataComp's 200 px or beyond its aspect ratio of 3."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    out = []
    for i in range(count):
        base = photos[i % len(photos)]
        w, h = base.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = base.crop((left, top, left + cw, top + ch))
        long_side = int(rng.integers(200, 1601))
        aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(3.4))))
        width = long_side if aspect >= 1 else max(1, round(long_side * aspect))
        height = max(1, round(long_side / aspect)) if aspect >= 1 else long_side
        scaled = crop.resize((max(120, width), max(120, height)), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        if rng.random() < 0.8:
            scaled.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
        else:
            scaled.save(buf, "PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


# --- the three implementations ---------------------------------------------------------------------------------


def pair_tables(images: list[bytes]) -> list:
    """The images as pair tables of ``BATCH`` rows, as a reader yields them (built before the clock starts, as
    img2dataset's resizer is handed bytes)."""
    from phi3data.multimodal.records import make_pairs

    return [make_pairs({"image": b, "text": "a photo"} for b in images[i:i + BATCH])
            for i in range(0, len(images), BATCH)]


def run_phi3data(tables: list) -> tuple[int, list[int]]:
    """The recipe's stages, batch by batch; (images kept, their pHashes)."""
    from phi3data.pipelines.stages.image import ImageDecode, ImageDedup, ImageResize, ImageSize

    decode = ImageDecode(ImageDecode.Params(phash=True))
    size = ImageSize(ImageSize.Params(preset="datacomp"))
    dedup = ImageDedup(ImageDedup.Params())
    resize = ImageResize(ImageResize.Params(mode="pad", size=SIZE, format="jpeg", quality=95))
    kept, hashes = 0, []
    for batch in tables:
        batch = size.process(decode.process(batch).batch).batch
        keys = dedup.keys(batch)
        labels = keys.column("id").to_pylist()[::len(dedup.bands())]  # one key row per band per image
        hashes.extend(int(label.rpartition("\x1e")[2], 16) for label in labels)
        kept += resize.process(batch).batch.num_rows
    return kept, hashes


def load_img2dataset_resizer():
    """img2dataset's resizer module, loaded on its own from wherever the package lies (IMG2DATASET_PATH too)."""
    extra = os.environ.get("IMG2DATASET_PATH")
    if extra and extra not in sys.path:
        sys.path.append(extra)
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "resizer.py"
    module_spec = importlib.util.spec_from_file_location("img2dataset_resizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def run_img2dataset(images: list[bytes], resizer_module) -> tuple[int, list[int]]:
    """img2dataset's Resizer (decode, size and aspect filter, resize, encode) + imagehash's pHash."""
    import imagehash

    resizer = resizer_module.Resizer(image_size=SIZE, resize_mode="border", resize_only_if_bigger=False,
                                     encode_format="jpg", encode_quality=95, min_image_size=MIN_SIDE,
                                     max_aspect_ratio=MAX_ASPECT)
    kept, hashes = 0, []
    for data in images:
        out, *_, err = resizer(io.BytesIO(data))
        if err is None:
            hashes.append(int(str(imagehash.phash(Image.open(io.BytesIO(data)))), 16))
            kept += 1
    return kept, hashes


def run_pillow(images: list[bytes]) -> tuple[int, list[int]]:
    """The same work as a plain Pillow loop."""
    import imagehash

    kept, hashes = 0, []
    for data in images:
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception:
            continue
        w, h = image.size
        if min(w, h) < MIN_SIDE or max(w, h) / min(w, h) > MAX_ASPECT:
            continue
        hashes.append(int(str(imagehash.phash(image)), 16))
        rgb = image.convert("RGB")
        side = max(w, h)
        square = Image.new("RGB", (side, side), (122, 116, 104))
        square.paste(rgb, ((side - w) // 2, (side - h) // 2))
        buf = io.BytesIO()
        square.resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=95)
        kept += 1
    return kept, hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import cv2

    cv2.setNumThreads(1)
    started = time.perf_counter()
    images = varied_images(args.images)
    megapixels = sum(np.prod(Image.open(io.BytesIO(b)).size) for b in images) / 1e6
    print(f"{len(images)} images, {sum(map(len, images)) / 1e6:.1f} MB, {megapixels:.0f} Mpx "
          f"(built in {time.perf_counter() - started:.1f} s)")

    tables = pair_tables(images)
    runs = {"phi3data": lambda _: run_phi3data(tables), "pillow loop": run_pillow}
    resizer = load_img2dataset_resizer()
    if resizer is None:
        print("img2dataset not found (see this file's docstring for the side install): comparing with Pillow only")
    else:
        runs["img2dataset"] = lambda imgs: run_img2dataset(imgs, resizer)
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    names = list(runs)
    for round_no in range(args.rounds):
        for name in names[round_no % len(names):] + names[:round_no % len(names)]:
            t0 = time.perf_counter()
            results[name] = runs[name](images)
            times[name].append(time.perf_counter() - t0)
        print(f"round {round_no + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in names))
    anchor = "img2dataset" if "img2dataset" in runs else "pillow loop"
    base = len(images) / statistics.median(times[anchor])
    print(f"\n{'':14s} {'images/s/core':>14s} {'ratio':>7s} {'kept':>6s}")
    for name in names:
        rate = len(images) / statistics.median(times[name])
        print(f"{name:14s} {rate:14.1f} {rate / base:6.2f}x {results[name][0]:6d}")
    ours, theirs = results["phi3data"][1], results[anchor][1]
    if len(ours) == len(theirs):
        same = sum(a == b for a, b in zip(ours, theirs))
        print(f"pHash bits equal to imagehash's on {same}/{len(ours)} kept images")


if __name__ == "__main__":
    main()
