"""Preview images while training (``logging.sample_every``).

Every ``logging.sample_every`` rounds and after the last round the policy draws a fixed set of
prompts (``logging.sample_prompts``, else the first ``logging.sample_count`` of ``eval.prompts``,
else of the training prompts) with :func:`spo.sampling.ddim_sample` and the run's ``sampling.*``
(steps, eta, guidance), from the same noise every time: one generator per prompt, seeded by
(seed, "previews", i), so the previews of a run differ only by the weights. The reference model
(adapters disabled; the frozen copy under full fine-tuning) draws the same prompts from the same
noise once per run. Each draw is one captioned grid (:func:`spo.images.comparison_grid`), written
atomically to ``RUN_DIR/samples/round-NNNNNN.png`` (after NNNNNN rounds) or
``RUN_DIR/samples/reference.png`` and logged to the trackers (TensorBoard ``previews/policy`` at
step NNNNNN, ``previews/reference``; wandb too) by :meth:`Previews.publish`.

Previews change nothing of the training: only the main process draws (the others wait), from its
own generators, in eval mode, with the global RNG states (Python, NumPy, torch, CUDA) put back
after, and through the unwrapped denoiser (no collective of a DDP wrapper). A preview whose file
exists is not drawn again (a resumed run), except the reference when its file is missing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backbones import Backbone
from ..config import SPOConfig
from ..data import load_prompts
from ..errors import SPOError
from ..files import atomic_path
from ..images import comparison_grid, to_pil
from ..sampling import ddim_sample
from .distributed import write_everywhere
from .engines import sharded
from .seeding import generator, rng_state, set_rng_state

#: where the previews go, under the run directory (``spo report`` reads them there)
PREVIEW_DIR = "samples"
#: the reference model's grid
REFERENCE_FILE = "reference.png"
#: the tracker tags
POLICY_TAG, REFERENCE_TAG = "previews/policy", "previews/reference"


class PreviewError(SPOError, ValueError):
    """The previews cannot be drawn as configured (no prompt, a prompt the model refuses)."""


def preview_file(rounds_done: int) -> str:
    """The file name of the policy's preview after ``rounds_done`` rounds."""
    return f"round-{rounds_done:06d}.png"


def preview_prompts(config: SPOConfig, training_prompts: Sequence[str]) -> list[str]:
    """``logging.sample_prompts``, else the first ``logging.sample_count`` prompts of
    ``eval.prompts`` when set, else of ``training_prompts`` (``config``'s ``toy:`` names resolved
    or not: :func:`spo.data.load_prompts` reads both)."""
    logging = config.logging
    if logging.sample_prompts:
        return list(logging.sample_prompts)
    source = load_prompts(config.eval.prompts) if config.eval.prompts else list(training_prompts)
    prompts = list(source[: logging.sample_count])
    if not prompts:
        raise PreviewError("logging.sample_every: the previews need prompts: set logging.sample_prompts or "
                           "eval.prompts (this run reads no prompt list)")
    return prompts


def preview_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per preview prompt, seeded by (seed, "previews", i): every preview of a
    run (and its reference) starts from the same noise."""
    return [generator(seed, "previews", i) for i in range(count)]


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Put the global RNG states (Python, NumPy, torch, CUDA) back when the block ends."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class Previews:
    """The previews of one run (see the module docstring); ``every`` = 0 draws nothing.

    Args:
        config: the run's configuration (``logging``, ``sampling``, ``seed``, ``train.rounds``).
        backbone: the model being trained (the policy; its reference through ``reference_model()``).
        accelerator: the run's accelerator (main process, trackers, autocast).
        run_dir: the run directory (the grids go to ``RUN_DIR/samples/``).
        prompts: the preview prompts (:func:`preview_prompts`).
    """

    def __init__(self, config: SPOConfig, backbone: Backbone, accelerator: Any, run_dir: str | Path,
                 prompts: Sequence[str]) -> None:
        self.config = config
        self.backbone = backbone
        self.accelerator = accelerator
        self.directory = Path(run_dir) / PREVIEW_DIR
        self.prompts = list(prompts)
        self.every = config.logging.sample_every
        self.rounds = config.train.rounds
        #: (tag, grid, step) drawn and not yet logged to the trackers
        self.pending: list[tuple[str, Any, int]] = []

    @classmethod
    def from_config(cls, config: SPOConfig, backbone: Backbone, accelerator: Any, run_dir: str | Path,
                    training_prompts: Sequence[str]) -> Previews:
        """The run's previews; with previews on, the prompts are read and checked by the backbone
        (a toy prompt outside the grammar fails here, before any round)."""
        prompts: list[str] = []
        if config.logging.sample_every > 0:
            prompts = preview_prompts(config, training_prompts)
            try:
                backbone.check_prompts(prompts)
            except ValueError as err:
                raise PreviewError(f"the preview prompts (logging.sample_prompts, eval.prompts or data.prompts): "
                                   f"{err}") from err
        return cls(config, backbone, accelerator, run_dir, prompts)

    def due(self, rounds_done: int) -> bool:
        """Whether the policy draws its preview after ``rounds_done`` rounds."""
        return self.every > 0 and rounds_done > 0 and (rounds_done % self.every == 0 or rounds_done == self.rounds)

    def draw(self, rounds_done: int) -> float | None:
        """The previews due after ``rounds_done`` rounds (the policy's, and the reference's when its
        file is missing), drawn on the main process while the others wait; returns the seconds it
        took (``preview_seconds``), or ``None`` when none is due. A failure on the main process
        raises the same :class:`~spo.training.distributed.WriteError` on every process.

        Under FSDP (:func:`~spo.training.engines.sharded`) every forward is a collective, so
        every process draws the same images (same prompts, same noise) and the main process
        writes them."""
        if not self.due(rounds_done):
            return None
        start = time.perf_counter()
        what = f"drawing the previews after {rounds_done} rounds into {self.directory}"
        if not sharded(self.accelerator):
            write_everywhere(self.accelerator, what, lambda: self._write_all(self._draw(self._missing(rounds_done))))
            return time.perf_counter() - start
        from accelerate.utils import broadcast_object_list

        missing = broadcast_object_list([self._missing(rounds_done)])[0]  # the main process's view
        drawn = self._draw(missing)
        write_everywhere(self.accelerator, what, lambda: self._write_all(drawn))
        return time.perf_counter() - start

    def _missing(self, rounds_done: int) -> list[tuple[str, bool, str, str, int]]:
        """The grids to draw: (file, by the reference, column label, tracker tag, step)."""
        missing = []
        if not (self.directory / REFERENCE_FILE).exists():
            missing.append((str(self.directory / REFERENCE_FILE), True, "reference", REFERENCE_TAG, rounds_done))
        policy = self.directory / preview_file(rounds_done)
        if not policy.exists():
            label = f"after {rounds_done} round" + ("" if rounds_done == 1 else "s")
            missing.append((str(policy), False, label, POLICY_TAG, rounds_done))
        return missing

    def _draw(self, missing: list[tuple[str, bool, str, str, int]]) -> list[tuple[Path, Any, str, int]]:
        return [(Path(path), self.grid(self.sample(reference=reference), label), tag, step)
                for path, reference, label, tag, step in missing]

    def _write_all(self, drawn: list[tuple[Path, Any, str, int]]) -> None:
        for path, grid, tag, step in drawn:
            self._write(path, grid, tag, step)

    def _write(self, path: Path, grid: Any, tag: str, step: int) -> None:
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        self.pending.append((tag, grid, step))

    @torch.no_grad()
    def sample(self, *, reference: bool = False) -> torch.Tensor:
        """The preview prompts' images in [-1, 1] (on the CPU) from the fixed noise, drawn by the
        policy or (``reference``) by the reference model, without touching any RNG the training
        uses."""
        backbone, s = self.backbone, self.config.sampling
        unet = backbone.unet
        was_training, wrapped = unet.training, backbone.policy_forward
        model = backbone.reference_model() if reference else contextlib.nullcontext()
        try:
            unet.eval()  # no dropout: nothing drawn from the global generator
            backbone.policy_forward = None  # the module itself, not a DDP wrapper (no collective but FSDP's)
            with rng_untouched(), model, self.accelerator.autocast():
                latents = ddim_sample(backbone, self.prompts, num_inference_steps=s.num_inference_steps, eta=s.eta,
                                      guidance_scale=s.guidance_scale,
                                      generator=preview_generators(self.config.seed, len(self.prompts)))
                chunk = s.decode_batch_size or len(latents)
                return torch.cat([backbone.decode(latents[i : i + chunk]).float().cpu()
                                  for i in range(0, len(latents), chunk)])
        finally:
            backbone.policy_forward = wrapped
            unet.train(was_training)

    def grid(self, images: torch.Tensor, label: str) -> Any:
        """One column under ``label``: each prompt's caption above its image (128 to 256 px)."""
        pictures = to_pil(images)
        cell = max(128, min(256, pictures[0].width))
        return comparison_grid([(p, [im]) for p, im in zip(self.prompts, pictures)], [label], cell=cell)

    def publish(self, wandb_step: int | None = None) -> None:
        """Log the grids drawn since the last call to the trackers (main process): TensorBoard at
        the preview's step (rounds done), wandb at ``wandb_step`` when given (its history step,
        which never goes back), else the same."""
        pending, self.pending = self.pending, []
        if not pending or not self.accelerator.is_main_process:
            return
        import numpy as np

        for tracker in self.accelerator.trackers:
            for tag, grid, step in pending:
                if tracker.name == "tensorboard":
                    tracker.log_images({tag: np.asarray(grid)[None]}, step=step, dataformats="NHWC")
                elif tracker.name == "wandb":
                    tracker.log_images({tag: [grid]}, step=step if wandb_step is None else wandb_step)
                elif hasattr(tracker, "log_images"):
                    tracker.log_images({tag: [np.asarray(grid)]}, step=step)
            writer = getattr(tracker, "writer", None)
            if tracker.name == "tensorboard" and writer is not None:
                writer.flush()
