"""The main job (``spo demo``, ``make demo``): SPO on the toy world end to end, then before/after.

1. fine-tune the shipped toy base model with SPO, scored by the shipped toy SPM (the ``toy``
   preset; overrides as ``key=value``), into ``OUTPUT/spo``, with previews every
   :data:`PREVIEW_EVERY` rounds (``OUTPUT/spo/samples/``: the first four validation prompts from
   fixed noise; about a second each on 2 CPU cores); an interrupted demo resumes;
2. ``spo eval``: base vs fine-tuned on the validation prompts with the same seeds, scored by the
   toy PickScore and the two oracles, into ``OUTPUT/eval`` (table, ``eval.json``, grids);
3. ``spo report``: one HTML page, ``OUTPUT/report.html`` (curves, evaluation, config).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import load_config
from ..data import load_prompts
from ..sampling import PoolScorer
from ..training import SPOTrainer
from .eval_run import evaluate_run


#: the demo's previews (``logging.sample_every``; an override ``logging.sample_every=0`` turns them off)
PREVIEW_EVERY = 10


def run_demo(output: str | Path, overrides: Sequence[str] = (), *, eval_seeds: int | None = None,
             eval_prompts: int | None = None, progress: bool = True, scorer: PoolScorer | None = None) -> dict[str, Any]:
    """Train into ``OUTPUT/spo`` (resuming what is there) and evaluate into ``OUTPUT/eval``;
    ``scorer`` replaces the preset's SPM (benchmarks' controls)."""
    output = Path(output)
    config = load_config("toy", [f"logging.sample_every={PREVIEW_EVERY}", *overrides])
    run_dir = output / "spo"
    start = time.perf_counter()
    # an interrupted demo resumes (from its latest checkpoint, or from the start when it had none)
    trainer = SPOTrainer(config, run_dir, scorer=scorer, resume=run_dir.is_dir(), progress=progress)
    result = trainer.train()
    train_seconds = time.perf_counter() - start
    prompts = load_prompts(config.eval.prompts or "toy:validation-prompts")
    if eval_prompts is not None:
        prompts = prompts[:eval_prompts]
    start = time.perf_counter()
    guidance = config.eval.guidance_scale if config.eval.guidance_scale is not None else config.sampling.guidance_scale
    evaluation = evaluate_run(run_dir, prompts, output / "eval", seeds=eval_seeds or config.eval.seeds,
                              guidance_scale=guidance, num_inference_steps=config.sampling.num_inference_steps)
    eval_seconds = time.perf_counter() - start
    from ..evaluation.report import write_report
    from ..training.model_card import update_model_cards

    update_model_cards(run_dir, eval_dirs=[output / "eval"])  # the LoRA's card, now with the evaluation table

    report = write_report(run_dir, eval_dirs=[output / "eval"], output=output / "report.html")
    return {"train": result, "train_seconds": train_seconds, "eval": evaluation,
            "eval_seconds": eval_seconds, "run_dir": run_dir, "report": report}
