"""Turning arbitrary image files into the canonical sample: square, RGB, 8-bit, lossless PNG.

Every input goes through ``load_rgb`` (mode normalisation, with a note per conversion) and then
``square_resize`` (centre crop to the largest square, Lanczos downscale). Problems that make an
image unusable raise ``SkipImage`` with a short machine-readable reason, so callers can count them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Suffixes the shard writer tries to read; any other file in the source is skipped and counted.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

# Flattening transparent pixels onto a fixed colour keeps the result deterministic; white is what
# most viewers show behind transparent regions.
ALPHA_BACKGROUND = (255, 255, 255)


class SkipImage(Exception):
    """An input that cannot become a sample; ``reason`` is a short key used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_rgb(source: str | Path | bytes) -> tuple[Image.Image, list[str]]:
    """Decode fully and return an 8-bit RGB image plus the conversions applied (e.g. ["grayscale"]).

    Raises SkipImage("not_an_image" | "corrupt" | "too_large") when the file cannot be used.
    """
    notes: list[str] = []
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with Image.open(fp) as opened:
            opened.load()  # full decode now: truncated files fail here, not later in a worker
            img = ImageOps.exif_transpose(opened)
            if img is opened:
                img = opened.copy()
    except UnidentifiedImageError as e:
        raise SkipImage("not_an_image", str(e)) from e
    except Image.DecompressionBombError as e:
        raise SkipImage("too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncation and corrupt streams as OSError/SyntaxError/ValueError
        raise SkipImage("corrupt", str(e)) from e
    return to_rgb8(img, notes), notes


def to_rgb8(img: Image.Image, notes: list[str]) -> Image.Image:
    """Normalise any Pillow mode to 8-bit RGB, appending a note for each non-trivial conversion."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling; scale to 0..255 here.
        notes.append("16bit")
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        notes.append("alpha")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1"):
        notes.append("grayscale")
    elif mode == "CMYK":
        notes.append("cmyk")
    elif mode == "P":
        notes.append("palette")
    else:
        notes.append(f"mode_{mode}")
    return img.convert("RGB")


def square_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Centre crop to the largest square, then Lanczos-resample to resolution × resolution.

    Raises SkipImage("too_small") when the short side is below ``resolution``: upsampling would put
    blurred faces into a data set whose likelihood is measured in bits per pixel.
    """
    w, h = img.size
    side = min(w, h)
    if side < resolution:
        raise SkipImage("too_small", f"{w}x{h} is smaller than {resolution}x{resolution}")
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side))
    if side == resolution:
        return square
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)


def encode_png(img: Image.Image | np.ndarray) -> bytes:
    """Lossless PNG without metadata chunks, so equal pixels always give equal bytes."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_rgb_array(data: bytes, resolution: int) -> np.ndarray:
    """Shard bytes -> uint8 array [H, W, 3]; SkipImage if undecodable or not resolution²."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            a = np.asarray(rgb)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipImage("undecodable", str(e)) from e
    if a.shape != (resolution, resolution, 3):
        raise SkipImage("wrong_size", f"{a.shape[1]}x{a.shape[0]}, expected {resolution}²")
    return a
