"""SPM training on the tiny world of the tests: validation pair accuracy per timestep.

Builds a tiny SD-1.5 pipeline (its VAE fitted for 150 steps so layout survives encode/decode),
a tiny random CLIP, and the tests' Pick-a-Pic-format data set (the image whose bright square is
in the left half wins; 96 train pairs with 4 ties and 2 corrupt rows, 48 validation pairs), then
runs `spo train-spm` for 40 steps and writes the accuracy before and after, per t, as JSON.

    python benchmarks/spm_tiny_accuracy.py --output benchmarks/results/spm-tiny-accuracy.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pickapic_fixture import save_pickapic  # noqa: E402

from spo.backbones.tiny import save_tiny_clip, save_tiny_pipeline  # noqa: E402
from spo.cli import format_accuracy_table  # noqa: E402
from spo.config import load_config  # noqa: E402
from spo.training.spm_trainer import SPMTrainer  # noqa: E402

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = save_tiny_pipeline("sd15", tmp / "sd15", seed=0, fit_vae_steps=150)
        clip = save_tiny_clip(tmp / "clip", seed=0)
        data = save_pickapic(tmp / "data", train=96, validation=48, ties=4, corrupt=2)
        config = load_config("sd15", [
            f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            f"preference.pretrained={clip}", f"spm.data={data}", f"spm.steps={args.steps}", "spm.lr=1e-3",
            "spm.batch_size=8", "spm.validate_every=1000", "spm.checkpoint_every=1000",
            "logging.tensorboard=false", "spm.weight_decay=0", "spm.lr_schedule=constant", "spm.mixed_precision=no",
            "spm.validate_on_start=false", "spm.validation_ties=skip", "spm.clean_validation_at_zero=false",
        ])
        start = time.perf_counter()
        trainer = SPMTrainer(config, tmp / "run", progress=False)
        before = trainer.validate()
        result = trainer.train()
        seconds = time.perf_counter() - start
    print(format_accuracy_table(result.validation, before))
    out = {"steps": result.steps, "seconds": round(seconds, 1), "skipped_rows": result.skipped_rows,
           "accuracy_before": before, "accuracy_after": result.validation}
    write_report(out, args.output)


if __name__ == "__main__":
    main()
