"""The toy world's renderer and its detail degradations (numpy, deterministic from a seed).

``render`` draws the exact scene of a prompt at 32x32 with anti-aliased edges (4x supersampling):
the clean picture. The *detail* axis is what the degradations spoil, independently of the prompt:
speckle noise, blur (soft edges), colour bleeding (one channel shifted), smudges (a faint stray
blob of the object colour). Layout mistakes (a misaligned render: wrong colour, shape, count,
size or background) are the other axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .grammar import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene

SIZE = 32
RADIUS = {"small": 4.0, "large": 6.5}
DEGRADATIONS: tuple[str, ...] = ("speckle", "blur", "bleed", "smudge")


def _shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    if shape == "square":
        h = r * 0.88  # about the area of the circle
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":  # apex up; base at cy + 0.8 r
        top, bottom = cy - r * 1.1, cy + r * 0.8
        half_width = (ys - top) / (bottom - top) * r * 1.15
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def place(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres inside the canvas, non-overlapping (a few pixels apart)."""
    r = RADIUS[scene.size]
    margin = r + 1.0
    for _ in range(1000):
        centres = [tuple(rng.uniform(margin, SIZE - margin, size=2)) for _ in range(scene.count)]
        if all(np.hypot(a[0] - b[0], a[1] - b[1]) > 2 * r + 2 for i, a in enumerate(centres) for b in centres[i + 1 :]):
            return centres  # type: ignore[return-value]
    raise RuntimeError(f"could not place {scene}")


def render(scene: Scene, rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
    """The clean image of ``scene``: float32 (32, 32, 3) in [0, 1], anti-aliased edges."""
    n = SIZE * supersample
    coords = (np.arange(n) + 0.5) / supersample
    xs, ys = np.meshgrid(coords, coords)
    coverage = np.zeros((n, n), dtype=np.float32)
    for cx, cy in place(scene, rng):
        coverage = np.maximum(coverage, _shape_mask(scene.shape, cx, cy, RADIUS[scene.size], xs, ys))
    alpha = coverage.reshape(SIZE, supersample, SIZE, supersample).mean(axis=(1, 3))[..., None]
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32) / 255
    fg = np.array(COLOURS[scene.colour], dtype=np.float32) / 255
    return (bg * (1 - alpha) + fg * alpha).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(round(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(k[i] * padded[i : i + SIZE, :, :] for i in range(2 * radius + 1))
    return sum(k[i] * rows[:, i : i + SIZE, :] for i in range(2 * radius + 1))


def degrade(img: np.ndarray, kind: str, strength: float, rng: np.random.Generator, colour: Sequence[float] | None = None) -> np.ndarray:
    """Apply one detail degradation with ``strength`` in (0, 1]."""
    out = img.copy()
    if kind == "speckle":
        out = out + rng.normal(0, 0.03 + 0.09 * strength, size=out.shape)
    elif kind == "blur":
        out = _blur(out, 0.5 + 0.9 * strength)
    elif kind == "bleed":
        shift = 1 + int(strength > 0.5)
        channel = int(rng.integers(0, 3))
        out[..., channel] = np.roll(out[..., channel], shift * (1 if rng.random() < 0.5 else -1), axis=int(rng.integers(0, 2)))
    elif kind == "smudge":
        c = np.array(colour if colour is not None else rng.uniform(0, 1, 3), dtype=np.float32)
        cy, cx = rng.uniform(4, SIZE - 4, size=2)
        r = 2.5 + 2.5 * strength
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        a = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2)))[..., None] * (0.35 + 0.3 * strength)
        out = out * (1 - a) + c * a
    else:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")
    return np.clip(out, 0, 1).astype(np.float32)


def degrade_randomly(img: np.ndarray, rng: np.random.Generator, scene: Scene, max_kinds: int = 2) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """1..max_kinds distinct degradations with random strengths; returns the image and what was done."""
    kinds = rng.choice(DEGRADATIONS, size=int(rng.integers(1, max_kinds + 1)), replace=False)
    applied = []
    for kind in kinds:
        strength = float(rng.uniform(0.2, 1.0))
        img = degrade(img, str(kind), strength, rng, np.array(COLOURS[scene.colour]) / 255)
        applied.append((str(kind), strength))
    return img, applied


def misalign(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with one layout attribute changed (a prompt-misaligned render)."""
    attribute = str(rng.choice(["count", "size", "colour", "shape", "background"]))
    options = {
        "count": [c for c in (1, 2) if c != scene.count],
        "size": [s for s in SIZES if s != scene.size],
        "colour": [c for c in COLOURS if c != scene.colour],
        "shape": [s for s in SHAPES if s != scene.shape],
        "background": [b for b in BACKGROUNDS if b != scene.background],
    }[attribute]
    return dataclasses.replace(scene, **{attribute: options[int(rng.integers(0, len(options)))]})


def to_tensor_range(img: np.ndarray) -> np.ndarray:
    """(32, 32, 3) in [0, 1] -> (3, 32, 32) in [-1, 1] (the models' convention)."""
    return (img.transpose(2, 0, 1) * 2 - 1).astype(np.float32)


def from_tensor_range(x: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return np.clip((np.asarray(x, dtype=np.float32).transpose(1, 2, 0) + 1) / 2, 0, 1)
