"""Image tensors to files: PNGs and labelled grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
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
