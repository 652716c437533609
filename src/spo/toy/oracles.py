"""The toy world's two oracles: alignment(image, prompt) and a prompt-agnostic aesthetic(image).

Used only to label preference data and to evaluate, never as a training signal of the method.

*Alignment* reads the layout back from the pixels: background = median of the border, objects =
connected regions far from it (after a 3x3 median filter, so speckle does not count), and checks
the five attributes of the prompt (background, count, colour, size, shape); the score is the
share that match, in [0, 1].

*Aesthetic* measures how cleanly the picture is drawn, whatever it shows. A clean render has two
colours (background and object) and, between them, only a one-pixel anti-aliased edge whose
colours lie on the segment between the two. Three defects are measured: the noise level (robust
Laplacian estimate), the colour distance off that segment (noise, colour bleeding), and the
intermediate-colour pixels outside the one-pixel edge band (blur, smudges), relative to the
band's size. aesthetic = exp(-(noise / 0.04 + off_line / 0.06 + excess / 1.0)) in (0, 1], where
the colour tolerances grow with the measured noise so that noise is counted once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .grammar import BACKGROUNDS, COLOURS, Scene, parse_prompt
from .render import RADIUS

_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
# constants of the aesthetic oracle, fixed before any method comparison (docs/toy-world.md)
NOISE_SCALE, OFF_LINE_SCALE, EXCESS_SCALE, PURE_TOLERANCE = 0.04, 0.06, 1.0, 0.06
AREA_PER_R2 = {"circle": np.pi, "square": 1.76**2, "triangle": 1.15 * 1.9}  # drawn area / radius^2


def _size_split(shape: str) -> float:
    """Area between a small and a large drawing of ``shape`` (geometric mean)."""
    return AREA_PER_R2[shape] * RADIUS["small"] * RADIUS["large"]


FILL_RATIO = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}


# The arithmetic below is written out channel by channel on purpose: numpy's ``@`` and
# ``np.linalg.norm`` of a vector go through BLAS, whose float32 kernels (picked per CPU by OpenBLAS:
# an AVX-512 machine uses fused multiply-adds where an AVX2 one does not) round differently, and a
# pixel that sits exactly on a threshold (a blurred edge is 0.5 covered) then flips. Element-wise
# ufuncs round the same everywhere, so the oracles, and :mod:`.batched_oracles` which repeats them
# operation by operation, give the same float32 decisions on every machine and numpy version.
def _dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b over the last axis (3), summed in order (float32 for float32 inputs)."""
    return (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]) + a[..., 2] * b[..., 2]


def _norm3(d: np.ndarray) -> np.ndarray:
    """Euclidean norm over the last axis (3), summed in order."""
    return np.sqrt(_dot3(d, d))


def _squared_length(axis: np.ndarray) -> float:
    """axis @ axis of a float32 colour axis: float32 products summed in float64, rounded to float32
    (what numpy's BLAS dot product returns for three float32 values, written out)."""
    p = (axis * axis).astype(np.float64)
    return float(np.float32((p[0] + p[1]) + p[2]))


def _percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) computed in float64. Written out because
    numpy < 2.4 computed the position of a float32 array in float32 (q / float32(100)), which
    moved the 98th percentile of 1024 values by up to 4e-5 of the gap between neighbours."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    position = q / 100 * (v.size - 1)
    lo = int(position)
    hi = min(lo + 1, v.size - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (position - lo))


def _conv3(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return sum(kernel[i, j] * padded[i : i + h, j : j + w] for i in range(3) for j in range(3))


def _median3(img: np.ndarray) -> np.ndarray:
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    stack = np.stack([padded[i : i + h, j : j + w] for i in range(3) for j in range(3)])
    return np.median(stack, axis=0)


def background_colour(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def object_colour(img: np.ndarray, bg: np.ndarray, threshold: float = 0.25) -> np.ndarray | None:
    """Median colour of the farther half of the pixels far from the background (edge pixels,
    partly background, are the nearer half), or ``None`` when nothing stands out."""
    distance = _norm3(img - bg)
    far = distance > threshold
    if far.sum() < 3:
        return None
    core = far & (distance >= np.median(distance[far]))
    return np.median(img[core], axis=0)


def _components(mask: np.ndarray, min_area: int = 6) -> list[np.ndarray]:
    """4-connected components of a boolean mask with at least ``min_area`` pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        queue, pixels = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) >= min_area:
            found.append(np.array(pixels))
    return found


@dataclass
class ReadLayout:
    """What the alignment oracle reads from an image."""

    background: str
    count: int
    colour: str | None
    sizes: list[str]
    shapes: list[str]


def _classify_shape(pixels: np.ndarray, fill: float) -> str:
    """Triangle when the bottom rows are much wider than the top rows (apex up); else square when
    the bounding box is nearly full, else circle."""
    rows = pixels[:, 0]
    top, bottom = rows.min(), rows.max()
    quarter = max(1, (bottom - top + 1) // 4)
    width_top = np.mean([np.sum(rows == r) for r in range(top, top + quarter)])
    width_bottom = np.mean([np.sum(rows == r) for r in range(bottom - quarter + 1, bottom + 1)])
    if (width_bottom - width_top) / max(width_bottom, 1) > 0.4:
        return "triangle"
    return "square" if fill > (FILL_RATIO["circle"] + FILL_RATIO["square"]) / 2 else "circle"


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(_norm3(colour.astype(np.float64) - np.array(palette[name]) / 255)))


def _coverage(img: np.ndarray, bg: np.ndarray, fg: np.ndarray | None) -> np.ndarray:
    """Per pixel: position along the background -> object colour axis (0 = bg, 1 = object)."""
    if fg is None:
        return np.zeros(img.shape[:2], dtype=np.float32)
    axis = fg - bg
    return np.clip(_dot3(img - bg, axis) / np.float32(max(_squared_length(axis), 1e-6)), 0, 1)


def read_layout(img: np.ndarray) -> ReadLayout:
    """Read background, objects, colour, sizes and shapes from an image (H, W, 3) in [0, 1]."""
    bg = background_colour(_median3(img))
    fg = object_colour(img, bg)
    components = _components(_coverage(img, bg, fg) > 0.5) if fg is not None else []
    colour = _nearest(fg, COLOURS) if components and fg is not None else None
    sizes, shapes = [], []
    for c in components:
        area = len(c)
        height = c[:, 0].max() - c[:, 0].min() + 1
        width = c[:, 1].max() - c[:, 1].min() + 1
        fill = area / (height * width)
        shape = _classify_shape(c, fill)
        shapes.append(shape)
        sizes.append("large" if area > _size_split(shape) else "small")
    return ReadLayout(_nearest(bg, BACKGROUNDS), len(components), colour, sizes, shapes)


def alignment(img: np.ndarray, prompt: str | Scene) -> float:
    """Share of the prompt's five attributes the image shows (background, count, colour, size, shape)."""
    scene = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    read = read_layout(img)
    checks = [
        read.background == scene.background,
        read.count == scene.count,
        read.colour == scene.colour,
        bool(read.sizes) and all(s == scene.size for s in read.sizes),
        bool(read.shapes) and all(s == scene.shape for s in read.shapes),
    ]
    return float(np.mean(checks))


def aesthetic_defects(img: np.ndarray) -> dict[str, float]:
    """The three measured defects of an image (H, W, 3) in [0, 1] (see the module docstring)."""
    img = img.astype(np.float32)
    lap = np.abs(_conv3(img, _LAPLACE))
    noise = float(np.median(lap)) * float(np.sqrt(np.pi / 2)) / 6
    bg = background_colour(_median3(img))
    fg = object_colour(img, bg)
    if fg is None:
        fg = bg
    axis = fg - bg
    length2 = _squared_length(axis)
    if length2 < 1e-6:
        off_line = _norm3(img - bg)
        alpha = np.zeros(img.shape[:2], dtype=np.float32)
    else:
        alpha = np.clip(_dot3(img - bg, axis) / np.float32(length2), 0, 1)
        off_line = _norm3(img - (bg + alpha[..., None] * axis))
    # noise is the noise term's business: tolerances grow with the measured noise level
    allowance = 3.0 * np.sqrt(3.0) * noise
    nearer = np.minimum(_norm3(img - bg), _norm3(img - fg))
    pure = nearer.astype(np.float64) < PURE_TOLERANCE + allowance  # compared in float64
    side = alpha > 0.5
    padded = np.pad(side, 1, mode="edge")
    h, w = side.shape
    neighbours = [padded[i : i + h, j : j + w] for i in range(3) for j in range(3)]
    band = np.any([n != side for n in neighbours], axis=0)
    excess = float(((~pure) & (~band)).sum() / (band.sum() + 8))
    return {"noise": noise, "off_line": max(0.0, _percentile(off_line, 98) - allowance), "excess": excess}


def aesthetic(img: np.ndarray) -> float:
    """Prompt-agnostic detail quality in (0, 1]: 1 = cleanly drawn."""
    d = aesthetic_defects(img)
    return float(np.exp(-(d["noise"] / NOISE_SCALE + d["off_line"] / OFF_LINE_SCALE + d["excess"] / EXCESS_SCALE)))
