"""Side-by-side comparison grids with captions: base | fine-tuned, same prompt, same seed
(the captioned grid itself, :func:`~spo.images.comparison_grid`, lives in :mod:`spo.images`: the
trainer's previews draw it too)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..images import comparison_grid

__all__ = ["comparison_grid", "write_comparison_grids"]


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
