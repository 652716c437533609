"""The toy world's oracles, batched in torch: the same definitions as :mod:`spo.toy.oracles`.

:mod:`spo.toy.oracles` (numpy, one image at a time) stays the reference; this module computes
the same scores for a batch at once, fast enough to judge every candidate of an SPO pool or to
label a large preference set. Where a threshold decides (which pixels are far from the
background, pure, on the object's side, part of an object), the float32 arithmetic follows the
reference operation by operation (norms and dot products summed channel by channel in order,
the colour axis's squared length summed in float64, medians as the mean of the two middle values,
the 98th percentile interpolated in float64, each comparison in the precision the reference
makes it), so the decisions agree; tests compare both on renders, degradations and model samples.
Neither side goes through BLAS (whose float32 kernels round differently per CPU), a numpy
function whose rounding changed between versions or torch's inexact CPU square root, so the
agreement holds on every machine.

Images are (B, H, W, 3) float32 in [0, 1], as the numpy oracles take them one by one
(:func:`to_oracle_images` converts the models' (B, 3, H, W) tensors in [-1, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .grammar import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, parse_prompt
from .oracles import (
    EXCESS_SCALE,
    FILL_RATIO,
    NOISE_SCALE,
    OFF_LINE_SCALE,
    PURE_TOLERANCE,
    _size_split,
)

_LAPLACE = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))
_FAR_THRESHOLD = 0.25  # object_colour's distance from the background
_MIN_AREA = 6  # smallest connected region that counts as an object
_PALETTES = {
    "colour": torch.tensor(list(COLOURS.values()), dtype=torch.float64) / 255,
    "background": torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float64) / 255,
}


def to_oracle_images(x: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] (the models' convention) -> (B, H, W, 3) float32 in [0, 1],
    exactly as :func:`spo.toy.render.from_tensor_range` converts one image."""
    x = x.detach().to("cpu", torch.float32).permute(0, 2, 3, 1)
    return ((x + 1) / 2).clamp(0, 1)


def _as_batch(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"oracle images must be (B, H, W, 3) in [0, 1], got shape {tuple(images.shape)}")
    return images.detach().to("cpu", torch.float32).contiguous()


# ---------------------------------------------------------------------------------- helpers
def _neighbourhood(x: Tensor) -> list[Tensor]:
    """The 9 shifts of (B, H, W, C) with edge padding, in the reference's (i, j) order."""
    h, w = x.shape[1:3]
    padded = F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    return [padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]


def _norm3(d: Tensor) -> Tensor:
    """Euclidean norm over the last axis (3), summed in order as the reference's ``_norm3``; the
    square root is numpy's, correctly rounded: torch's CPU ``sqrt`` (2.13) is one ulp low for about
    0.5% of float32 inputs, enough to move a pixel across a threshold (a median, the pure test)."""
    s = d * d
    return torch.from_numpy(np.sqrt(((s[..., 0] + s[..., 1]) + s[..., 2]).numpy()))


def _dot3(a: Tensor, b: Tensor) -> Tensor:
    """a @ b over the last axis (3), summed in order as the reference's ``_dot3``."""
    p = a * b
    return (p[..., 0] + p[..., 1]) + p[..., 2]


def _squared_length(axis: Tensor) -> Tensor:
    """axis @ axis per row as the reference's ``_squared_length``: float32 products summed in order
    in float64, rounded to float32 (a division by it decides pixels that sit exactly on a
    threshold: a blurred edge is 0.5 covered)."""
    p = (axis * axis).double()
    return ((p[..., 0] + p[..., 1]) + p[..., 2]).float()


def _percentile(values: Tensor, q: float) -> Tensor:
    """Per row of (B, N): the reference's ``_percentile`` (linear interpolation in float64)."""
    v = values.double().sort(dim=1).values
    n = v.shape[1]
    position = q / 100 * (n - 1)
    lo = int(position)
    hi = min(lo + 1, n - 1)
    return v[:, lo] + (v[:, hi] - v[:, lo]) * (position - lo)


def _median(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Median over dim 1 of (B, N[, C]) restricted to ``mask`` (B, N): the mean of the two middle
    values for an even count, as numpy's; rows with an empty mask give garbage (callers mask them)."""
    if mask is None:
        n = torch.full((values.shape[0],), values.shape[1], dtype=torch.long)
        ordered = values.sort(dim=1).values
    else:
        m = mask.view(*mask.shape, *([1] * (values.ndim - 2)))
        ordered = torch.where(m, values, torch.full_like(values, math.inf)).sort(dim=1).values
        n = mask.sum(dim=1).clamp(min=1)
    index = torch.stack([(n - 1) // 2, n // 2], dim=1)
    index = index.view(*index.shape, *([1] * (values.ndim - 2))).expand(-1, -1, *values.shape[2:])
    lo, hi = ordered.gather(1, index).unbind(1)
    return (lo + hi) / 2


# a median-of-9 selection network (19 compare-exchanges; Paeth): exact, and 3x faster than sorting
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
            (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _median3(img: Tensor) -> Tensor:
    """3x3 median filter per channel with edge padding (9 values: the exact middle one)."""
    v = _neighbourhood(img)
    for i, j in _MEDIAN9:
        v[i], v[j] = torch.minimum(v[i], v[j]), torch.maximum(v[i], v[j])
    return v[4]


def _background(img: Tensor) -> Tensor:
    """Median colour of the two-pixel border (the corners counted twice, as the reference)."""
    b = img.shape[0]
    border = torch.cat([img[:, :2].reshape(b, -1, 3), img[:, -2:].reshape(b, -1, 3),
                        img[:, :, :2].reshape(b, -1, 3), img[:, :, -2:].reshape(b, -1, 3)], dim=1)
    return _median(border)


def _object_colour(img: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
    """Per image: the object colour and whether one stands out (the reference's ``None``)."""
    b = img.shape[0]
    distance = _norm3(img - bg[:, None, None]).reshape(b, -1)
    far = distance > _FAR_THRESHOLD
    found = far.sum(dim=1) >= 3
    core = far & (distance >= _median(distance, far)[:, None])
    return _median(img.reshape(b, -1, 3), core), found


def _axis_position(img: Tensor, bg: Tensor, axis: Tensor, length2: Tensor) -> Tensor:
    """Position along the background -> object colour axis, clipped to [0, 1] (float32)."""
    return (_dot3(img - bg[:, None, None], axis[:, None, None]) / length2[:, None, None]).clamp(0, 1)


def _nearest(colour: Tensor, palette: str) -> Tensor:
    """Index of the nearest palette entry (float64 distances, first on ties, as the reference)."""
    return _norm3(colour.double()[:, None] - _PALETTES[palette][None]).argmin(dim=1)


# ---------------------------------------------------------------------------------- aesthetic
def aesthetic_defects_batch(images: Tensor) -> dict[str, Tensor]:
    """The three defects of :func:`spo.toy.oracles.aesthetic_defects` for a batch (float64, (B,))."""
    img = _as_batch(images)
    b = img.shape[0]
    lap: Tensor | int = 0
    for k, shifted in zip((v for row in _LAPLACE for v in row), _neighbourhood(img)):
        lap = lap + k * shifted
    lap = torch.as_tensor(lap).abs()
    noise = _median(lap.reshape(b, -1)).double() * math.sqrt(math.pi / 2) / 6
    bg = _background(_median3(img))
    fg, found = _object_colour(img, bg)
    fg = torch.where(found[:, None], fg, bg)
    axis = fg - bg
    length2 = _squared_length(axis)
    degenerate = length2.double() < 1e-6
    alpha = torch.where(degenerate[:, None, None], torch.zeros(()), _axis_position(img, bg, axis, length2))
    on_line = bg[:, None, None] + alpha[..., None] * axis[:, None, None]
    off_line = torch.where(degenerate[:, None, None], _norm3(img - bg[:, None, None]), _norm3(img - on_line))
    allowance = 3.0 * math.sqrt(3.0) * noise
    nearer = torch.minimum(_norm3(img - bg[:, None, None]), _norm3(img - fg[:, None, None]))
    pure = nearer.double() < (PURE_TOLERANCE + allowance)[:, None, None]  # a float64 scalar in numpy: compared in float64
    side = (alpha > 0.5).float()[..., None]
    band = torch.stack([n != side for n in _neighbourhood(side)]).any(dim=0)[..., 0]
    excess = ((~pure) & (~band)).sum(dim=(1, 2)).double() / (band.sum(dim=(1, 2)).double() + 8)
    p98 = _percentile(off_line.reshape(b, -1), 98)
    return {"noise": noise, "off_line": (p98 - allowance).clamp(min=0.0), "excess": excess}


def aesthetic_batch(images: Tensor) -> Tensor:
    """:func:`spo.toy.oracles.aesthetic` for (B, H, W, 3) images in [0, 1]: (B,) float64 in (0, 1]."""
    d = aesthetic_defects_batch(images)
    return torch.exp(-(d["noise"] / NOISE_SCALE + d["off_line"] / OFF_LINE_SCALE + d["excess"] / EXCESS_SCALE))


# ---------------------------------------------------------------------------------- alignment
def _component_labels(mask: Tensor) -> Tensor:
    """4-connected components of (B, H, W) masks: every pixel of a component carries the largest
    flat index + 1 among its pixels, background 0 (label propagation until nothing changes)."""
    b, h, w = mask.shape
    labels = (torch.arange(1, h * w + 1).view(1, h, w) * mask).long()
    while True:
        p = F.pad(labels, (1, 1, 1, 1))
        grown = torch.maximum(torch.maximum(torch.maximum(labels, p[:, :-2, 1:-1]), torch.maximum(p[:, 2:, 1:-1], p[:, 1:-1, :-2])),
                              p[:, 1:-1, 2:]) * mask
        if torch.equal(grown, labels):
            return labels
        labels = grown


def _objects(mask: Tensor) -> dict[str, Tensor]:
    """The regions of at least 6 pixels, as the reference's ``_components`` finds them, with what
    ``read_layout`` reads of each: image index, area, shape index (SHAPES) and size index (SIZES)."""
    b, h, w = mask.shape
    labels = _component_labels(mask)
    image = torch.arange(b).view(b, 1, 1).expand(b, h, w)
    rows = torch.arange(h).view(1, h, 1).expand(b, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(b, h, w)
    on = labels > 0
    key = image[on] * (h * w + 1) + labels[on]
    _, comp, area = torch.unique(key, return_inverse=True, return_counts=True)
    n = area.numel()
    r, c = rows[on], cols[on]

    def reduce(values: Tensor, how: str) -> Tensor:
        start = torch.full((n,), h * w if how == "amin" else -1, dtype=torch.long)
        return start.scatter_reduce(0, comp, values, reduce=how)

    top, bottom, left, right = reduce(r, "amin"), reduce(r, "amax"), reduce(c, "amin"), reduce(c, "amax")
    owner = torch.zeros(n, dtype=torch.long).scatter_reduce(0, comp, image[on], reduce="amax")
    per_row = torch.bincount(comp * h + r, minlength=n * h).view(n, h).double()
    height, width = bottom - top + 1, right - left + 1
    quarter = (height // 4).clamp(min=1)
    row = torch.arange(h).view(1, h)
    in_top = (row >= top[:, None]) & (row < (top + quarter)[:, None])
    in_bottom = (row > (bottom - quarter)[:, None]) & (row <= bottom[:, None])
    width_top = (per_row * in_top).sum(dim=1) / quarter.double()
    width_bottom = (per_row * in_bottom).sum(dim=1) / quarter.double()
    triangle = (width_bottom - width_top) / width_bottom.clamp(min=1.0) > 0.4
    fill = area.double() / (height * width).double()
    square = fill > (FILL_RATIO["circle"] + FILL_RATIO["square"]) / 2
    shape = torch.where(triangle, SHAPES.index("triangle"), torch.where(square, SHAPES.index("square"),
                                                                          SHAPES.index("circle")))
    split = torch.tensor([_size_split(s) for s in SHAPES], dtype=torch.float64)[shape]
    size = torch.where(area.double() > split, SIZES.index("large"), SIZES.index("small"))
    keep = area >= _MIN_AREA
    return {"image": owner[keep], "area": area[keep], "shape": shape[keep], "size": size[keep]}


def read_layout_batch(images: Tensor) -> dict[str, Tensor]:
    """What :func:`spo.toy.oracles.read_layout` reads, per image: background and colour indices
    (into BACKGROUNDS / COLOURS; colour -1 when no object), object count, and per object
    (``objects``: image index, area, shape, size)."""
    img = _as_batch(images)
    b = img.shape[0]
    bg = _background(_median3(img))
    fg, found = _object_colour(img, bg)
    axis = fg - bg
    length2 = torch.clamp(_squared_length(axis).double(), min=1e-6).float()  # max(float(axis @ axis), 1e-6)
    coverage = torch.where(found[:, None, None], _axis_position(img, bg, axis, length2), torch.zeros(()))
    objects = _objects(coverage > 0.5)
    count = torch.bincount(objects["image"], minlength=b)
    colour = torch.where((count > 0) & found, _nearest(fg, "colour"), -1)
    return {"background": _nearest(bg, "background"), "colour": colour, "count": count, "objects": objects}


def _scene_indices(prompts: Sequence[str | Scene]) -> dict[str, Tensor]:
    scenes = [parse_prompt(p) if isinstance(p, str) else p for p in prompts]
    return {
        "background": torch.tensor([list(BACKGROUNDS).index(s.background) for s in scenes]),
        "colour": torch.tensor([list(COLOURS).index(s.colour) for s in scenes]),
        "count": torch.tensor([s.count for s in scenes]),
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "size": torch.tensor([SIZES.index(s.size) for s in scenes]),
    }


def alignment_batch(images: Tensor, prompts: Sequence[str | Scene]) -> Tensor:
    """:func:`spo.toy.oracles.alignment` for a batch: the share of the five attributes (background,
    count, colour, size, shape) each image shows of its prompt, (B,) float64."""
    read = read_layout_batch(images)
    want = _scene_indices(prompts)
    if len(want["count"]) != len(read["count"]):
        raise ValueError(f"{len(read['count'])} images but {len(want['count'])} prompts")
    objects = read["objects"]
    b = len(read["count"])

    def all_match(attribute: str) -> Tensor:  # every object shows it, and there is one
        matches = torch.bincount(objects["image"], weights=(objects[attribute] == want[attribute][objects["image"]]).double(),
                                 minlength=b)
        return (read["count"] > 0) & (matches == read["count"])

    checks = torch.stack([
        read["background"] == want["background"],
        read["count"] == want["count"],
        read["colour"] == want["colour"],
        all_match("size"),
        all_match("shape"),
    ]).double()
    return checks.mean(dim=0)


__all__ = ["aesthetic_batch", "aesthetic_defects_batch", "alignment_batch", "read_layout_batch", "to_oracle_images"]
