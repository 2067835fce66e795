"""Procedural, face-like images, so demos and tests need no real data (`python -m pipeline synth`).

Each image is a pure function of (seed, index): background gradient, shoulders, neck, ears, hair, a
face oval with a jaw and side shading, eyes with iris and pupil, brows, a nose shadow and a mouth,
with shape, skin tone, hair style/colour, eye colour and expression drawn from per-image random
numbers. Drawing is vectorised numpy on a 2× supersampled grid (box-filtered down), so 512 images at
32² take well under a second.
"""

from __future__ import annotations

import hashlib

import numpy as np

SKIN_LIGHT = np.array([246.0, 214.0, 186.0])
SKIN_DARK = np.array([92.0, 58.0, 40.0])
HAIR = np.array(
    [[24, 20, 18], [64, 42, 28], [110, 72, 40], [196, 160, 96], [150, 62, 30], [170, 170, 172]],
    dtype=np.float64,
)
IRIS = np.array([[70, 45, 25], [40, 90, 150], [60, 110, 70], [110, 90, 60]], dtype=np.float64)


def face_seed(seed: int, index: int) -> int:
    """64-bit seed for image ``index``; hashing keeps nearby (seed, index) pairs unrelated."""
    digest = hashlib.blake2b(f"synth:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def make_face(resolution: int, seed: int, index: int) -> np.ndarray:
    """One synthetic face as a uint8 array [resolution, resolution, 3]."""
    rng = np.random.default_rng(face_seed(seed, index))
    ss = 2 if resolution <= 256 else 1  # supersampling factor: soft edges at small sizes
    n = resolution * ss
    t = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    y, x = np.meshgrid(t, t, indexing="ij")  # y down, x right, both in [-1, 1]
    img = np.empty((n, n, 3))

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        img[mask] = colour

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    # background: vertical gradient between two random colours
    top, bottom = rng.uniform(30, 230, size=(2, 3))
    w = ((y + 1) / 2)[..., None]
    img[:] = top * (1 - w) + bottom * w

    skin = SKIN_LIGHT + (SKIN_DARK - SKIN_LIGHT) * rng.beta(1.3, 1.6) + rng.normal(0, 6, 3)
    hair = HAIR[rng.integers(len(HAIR))] * rng.uniform(0.8, 1.15) + rng.normal(0, 5, 3)
    cloth = rng.uniform(20, 235, 3)
    cx, cy = rng.normal(0, 0.04), rng.uniform(-0.08, 0.06)
    a, b = rng.uniform(0.42, 0.52), rng.uniform(0.56, 0.66)  # face half-width, half-height
    long_hair = rng.random() < 0.45
    bald = rng.random() < 0.08

    paint(ellipse(cx, 1.15, 0.95, 0.5), cloth)  # shoulders
    paint((np.abs(x - cx) < a * 0.45) & (y > cy) & (y < cy + b + 0.35), skin * 0.88)  # neck
    if long_hair and not bald:
        paint(
            ellipse(cx, cy + 0.1, a * 1.3, b * 1.15) & (y < cy + b * rng.uniform(0.4, 0.9)),
            hair * 0.9,
        )
    paint(ellipse(cx - a * 1.02, cy, a * 0.16, b * 0.22), skin * 0.95)  # ears
    paint(ellipse(cx + a * 1.02, cy, a * 0.16, b * 0.22), skin * 0.95)

    # face oval whose lower half narrows towards the chin
    jaw = rng.uniform(0.15, 0.4)
    half_w = a * (1 - jaw * np.clip((y - cy) / b, 0, 1) ** 2)
    face = (np.abs(x - cx) <= half_w * np.sqrt(np.clip(1 - ((y - cy) / b) ** 2, 0, 1))) & (
        np.abs(y - cy) <= b
    )
    shade = 1 - 0.22 * np.clip(np.abs(x - cx) / a, 0, 1) ** 2  # rounder look: darker at the sides
    img[face] = skin * shade[face][:, None]

    if not bald:  # hair cap above a wavy hairline
        hairline = cy - b * rng.uniform(0.35, 0.6) + 0.03 * np.sin(x * rng.uniform(6, 14))
        cap = ellipse(cx, cy - b * 0.15, a * 1.12, b * 1.0) & (y < hairline)
        paint(cap, hair)

    ey = cy - b * rng.uniform(0.08, 0.18)
    ex = a * rng.uniform(0.34, 0.44)
    er = a * rng.uniform(0.13, 0.17)
    iris = IRIS[rng.integers(len(IRIS))]
    brow = hair * 0.7 if not bald else skin * 0.6
    lift = rng.uniform(-0.03, 0.03)
    for side in (-1, 1):
        px = cx + side * ex
        paint(ellipse(px, ey, er, er * 0.55), np.array([240.0, 238.0, 232.0]))
        gaze = rng.normal(0, er * 0.12)
        paint(ellipse(px + gaze, ey, er * 0.5, er * 0.5), iris)
        paint(ellipse(px + gaze, ey, er * 0.22, er * 0.22), np.array([15.0, 12.0, 12.0]))
        paint(ellipse(px, ey - er * 1.25 + side * lift, er * 1.2, er * 0.22), brow)

    nose = ellipse(cx, cy + b * 0.18, a * 0.09, b * 0.2) & (x > cx)
    img[nose] *= 0.85

    my, mw = cy + b * rng.uniform(0.48, 0.58), a * rng.uniform(0.28, 0.42)
    smile = rng.uniform(-0.1, 0.5)
    curve = my + smile * (mw - np.abs(x - cx).clip(0, mw)) ** 2 / mw
    lips = skin * np.array([0.85, 0.55, 0.55]) + np.array([30.0, 0.0, 0.0])
    paint((np.abs(x - cx) < mw) & (np.abs(y - curve - 0.015) < b * rng.uniform(0.04, 0.07)), lips)

    img = img.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))
    img += rng.normal(0, 2.0, img.shape)  # sensor-like noise so no two pixels are exactly flat
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
