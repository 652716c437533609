"""Side-by-side comparison grids with captions: base | fine-tuned, same prompt, same seed."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


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


def write_comparison_grids(
    directory: Path,
    name: str,
    prompts: Sequence[str],
    image_paths: dict[str, dict[tuple[int, int], Path]],
    models: Sequence[str],
    *,
    seeds: Sequence[int],
    prompts_per_grid: int = 8,
    max_grids: int = 4,
    cell: int | None = None,
) -> list[Path]:
    """Grids of the first ``prompts_per_grid * max_grids`` prompts: columns = each seed's images
    of ``models`` (e.g. base, spo) side by side. ``image_paths[model][(prompt, seed)]``. Returns
    the files written (``NAME-00.png``, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    labels = [f"{m} · seed {s}" for s in seeds for m in models]
    written = []
    for g in range(max_grids):
        chunk = range(g * prompts_per_grid, min(len(prompts), (g + 1) * prompts_per_grid))
        if not len(chunk):
            break
        rows = []
        for i in chunk:
            images = [Image.open(image_paths[m][(i, s)]) for s in seeds for m in models]
            rows.append((f"{i}: {prompts[i]}", images))
        size = cell or max(64, min(256, max(im.width for _, ims in rows for im in ims)))
        path = directory / f"{name}-{g:02d}.png"
        comparison_grid(rows, labels, cell=size).save(path)
        for _, ims in rows:
            for im in ims:
                im.close()
        written.append(path)
    return written
