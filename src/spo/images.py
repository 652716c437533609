"""Image tensors to files: PNGs and labelled grids."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_pil(images: Tensor) -> list[Image.Image]:
    """Images in [-1, 1], shape (B, 3, H, W), to PIL RGB images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def image_grid(images: Sequence[Image.Image], cols: int, cell: int | None = None) -> Image.Image:
    """Tile images in rows of ``cols``; ``cell`` resizes each tile (nearest) to cell x cell pixels."""
    if not images:
        raise ValueError("no image to put in a grid")
    if cell is not None:
        images = [im.resize((cell, cell), Image.NEAREST) for im in images]
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(images: Tensor, directory: str | Path, prefix: str = "image") -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(to_pil(images)):
        path = directory / f"{prefix}_{i:04d}.png"
        im.save(path)
        paths.append(path)
    return paths


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def comparison_grid(
    rows: Sequence[tuple[str, Sequence[Image.Image]]],
    column_labels: Sequence[str],
    *,
    cell: int = 256,
    pad: int = 6,
) -> Image.Image:
    """One row per prompt: its caption above, then its images (e.g. base s0, model s0, base s1,
    model s1) under ``column_labels``. Images are resized to ``cell`` px (nearest when enlarging,
    so a toy image stays crisp; Lanczos when shrinking)."""
    if not rows:
        raise ValueError("no row to put in a comparison grid")
    cols = len(column_labels)
    font_size = max(10, min(16, cell // 14))
    font = _font(font_size)
    line_h = font_size + 4
    chars = max(12, int((cols * (cell + pad)) / (font_size * 0.55)))
    captions = [textwrap.wrap(text, chars)[:3] or [""] for text, _ in rows]
    header_h = line_h + pad
    heights = [len(c) * line_h + pad + cell + pad for c in captions]
    width = pad + cols * (cell + pad)
    canvas = Image.new("RGB", (width, header_h + sum(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((pad + c * (cell + pad), pad // 2), label, fill=(60, 60, 60), font=font)
    y = header_h
    for (_, images), lines, h in zip(rows, captions, heights):
        for i, line in enumerate(lines):
            draw.text((pad, y + i * line_h), line, fill=(0, 0, 0), font=font)
        top = y + len(lines) * line_h + pad // 2
        for c, im in enumerate(images[:cols]):
            resample = Image.NEAREST if im.width < cell else Image.LANCZOS
            canvas.paste(im.convert("RGB").resize((cell, cell), resample), (pad + c * (cell + pad), top))
        y += h
    return canvas
