"""``spo toy build``: regenerate every shipped toy weight from seeds, stage by stage.

Stages (each writes under OUTPUT; a finished stage is not redone; an interrupted ``pretrain``,
``clip``, ``pickscore`` or ``spm`` stage resumes from its last checkpoint and ends with the
weights an uninterrupted one would have; an interrupted ``data`` stage starts again):

1. ``pretrain``  the base model and two weaker snapshots (``base/``, ``snapshot-*/``);
2. ``data``      the generic preference set in Pick-a-Pic format (``preference-data/``);
3. ``clip``      the toy CLIP, contrastive on renders (``clip/``);
4. ``pickscore`` the toy PickScore: the toy CLIP fine-tuned on the generic pairs, clean images,
                 through ``spo train-spm preference.variant=clean`` (``pickscore/``);
5. ``spm``       the toy SPM built from the toy PickScore through ``spo train-spm``, noised with
                 the base model (``spm/``), the same code path as Pick-a-Pic and SD.

``OUTPUT/build.json`` records the settings, each stage's wall time and summary; outputs found
on disk (e.g. from ``spo toy pretrain``) must have been made with the same settings. A stage's
final directory appears by an atomic rename, so a half-copied one never counts as done. Shipping is a copy:
``base``, the snapshots, ``clip``, ``pickscore`` and ``spm`` are what ``src/spo/toy/weights`` holds.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..builtin import TOY_BUILD_VERSIONS
from ..errors import SPOError
from ..files import atomic_directory, atomic_write_text
from .clip import ToyCLIPSettings, pretrain_toy_clip
from .preference_data import PreferenceDataSettings, build_preference_data
from .pretrain import PretrainSettings, pretrain

STAGES = ("pretrain", "data", "clip", "pickscore", "spm")
VERSIONS = TOY_BUILD_VERSIONS  # see BuildSettings.for_version


class BuildError(SPOError, RuntimeError):
    """The build cannot go on (nothing finished is lost)."""


@dataclass
class PreferenceTraining:
    """One ``spo train-spm`` run of the build (toy PickScore or toy SPM)."""

    steps: int
    batch_size: int = 16
    lr: float = 1e-4
    validate_every: int = 100
    checkpoint_every: int = 100
    validation_pairs: int | None = None  # None: every decided validation pair


@dataclass
class BuildSettings:
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    data: PreferenceDataSettings = field(default_factory=PreferenceDataSettings)
    clip: ToyCLIPSettings = field(default_factory=ToyCLIPSettings)
    pickscore: PreferenceTraining = field(default_factory=lambda: PreferenceTraining(steps=400))
    spm: PreferenceTraining = field(default_factory=lambda: PreferenceTraining(steps=600))

    @classmethod
    def for_version(cls, version: str) -> "BuildSettings":
        """The settings of a shipped build (:data:`VERSIONS`). The world and the base model are the
        same in every version; what changes is what would change in the real world: the volume of
        generic preference pairs and the reward models' training (docs/toy-world.md)."""
        if version == "v1":
            return cls()
        if version == "v2":  # pre-registered in docs/toy-world.md before it was trained
            return cls(
                data=PreferenceDataSettings(images_per_model=12, pairs_per_prompt=96, batch_size=32, channels_last=True),
                pickscore=PreferenceTraining(steps=3000, batch_size=32, validate_every=500, checkpoint_every=500),
                spm=PreferenceTraining(steps=3000, batch_size=16, validate_every=500, checkpoint_every=500,
                                       validation_pairs=512),
            )
        raise BuildError(f"unknown build version {version!r}; expected one of {list(VERSIONS)}")

    @classmethod
    def tiny(cls) -> "BuildSettings":
        """Minutes-scale budgets for tests: every stage runs for real, briefly."""
        pre = PretrainSettings(steps=20, batch_size=8, snapshots=[0.15, 0.4])
        return cls(
            pretrain=pre,
            data=PreferenceDataSettings(models=[*pre.snapshot_names(), "base"], images_per_model=2, pairs_per_prompt=3,
                                        prompts=20, num_inference_steps=4, validation_prompts=0.2),
            clip=ToyCLIPSettings(steps=10, batch_size=16),
            pickscore=PreferenceTraining(steps=4, batch_size=4, lr=1e-3, validate_every=2, checkpoint_every=2),
            spm=PreferenceTraining(steps=4, batch_size=4, lr=1e-3, validate_every=2, checkpoint_every=2),
        )


def _train_spm_overrides(output: Path, settings: PreferenceTraining, overrides: list[str], seed: int) -> list[str]:
    """The ``key=value`` overrides of the toy preset for one ``spo train-spm`` run of the build."""
    return [
        f"spm.data={output / 'preference-data'}", f"spm.steps={settings.steps}", f"spm.batch_size={settings.batch_size}",
        f"spm.lr={settings.lr}", f"spm.validate_every={settings.validate_every}",
        f"spm.checkpoint_every={settings.checkpoint_every}",
        f"spm.validation_pairs={'null' if settings.validation_pairs is None else settings.validation_pairs}", f"seed={seed}",
        "model.device=cpu", "logging.tensorboard=false", *overrides,
    ]


def _train_spm(run: Path, overrides: list[str], progress: bool = True) -> None:
    """What ``spo train-spm toy OVERRIDES --output RUN`` does (``--resume`` when ``run`` exists):
    validate before the first step of a fresh run, then train to the end. A refused or failed
    run is a :class:`BuildError` naming the cause."""
    from ..config import load_config
    from ..training import SPMTrainer

    resume = run.exists()
    try:
        trainer = SPMTrainer(load_config("toy", overrides), run, resume=resume, progress=progress)
        if not resume and trainer.step == 0:
            trainer.validate()
        trainer.train()
    except SPOError as err:
        raise BuildError(f"`spo train-spm` into {run} failed: {err}; fix the cause and rerun the build: "
                         "finished stages are kept") from err


def _read_validation(run: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [entry for entry in lines if entry.get("type") == "validation"]
    return {k: v for k, v in last[-1].items() if k.startswith("accuracy_")} if last else {}


class ToyBuild:
    """Runs the stages that are not finished yet; see the module docstring."""

    def __init__(self, output: str | Path, settings: BuildSettings | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = print, version: str | None = None) -> None:
        self.output = Path(output)
        self.settings = settings or BuildSettings()
        self.progress, self.log = progress, log
        self.record_path = self.output / "build.json"
        try:
            self.record: dict[str, Any] = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        except (OSError, ValueError) as err:
            raise BuildError(f"{self.record_path} is unreadable ({err}); move it away to rebuild the record") from None
        recorded = self.record.get("settings")
        wanted = json.loads(json.dumps(asdict(self.settings)))
        if recorded is not None and recorded != wanted:
            changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
            raise BuildError(f"{self.output} was built with other settings (stages {changed} differ); "
                             "use a new --output, or the settings recorded in build.json")
        self.record["settings"] = wanted
        self.record["version"] = version or self.record.get("version") or "custom"
        self.record.setdefault("stages", {})

    # ------------------------------------------------------------------ stage outputs
    def done(self, stage: str) -> bool:
        o = self.output
        return {
            "pretrain": (o / "pretrain.json").exists() and (o / "base" / "toy_model.json").exists(),
            "data": (o / "preference-data" / "statistics.json").exists(),
            "clip": (o / "clip" / "toy_clip.json").exists(),
            "pickscore": (o / "pickscore" / "preprocessor_config.json").exists(),  # placed by one rename
            "spm": (o / "spm" / "spm_config.json").exists(),
        }[stage]

    def _save_record(self) -> None:
        atomic_write_text(self.record_path, json.dumps(self.record, indent=2))

    # ------------------------------------------------------------------ stages
    def _pretrain(self) -> dict[str, Any]:
        return pretrain(self.output, self.settings.pretrain, progress=self.progress, resume=True)

    def _data(self) -> dict[str, Any]:
        missing = [m for m in self.settings.data.models if not (self.output / m / "toy_model.json").exists()]
        if missing:
            raise BuildError(f"{self.output}: no source model {missing} for the preference data; run the pretrain stage")
        target = self.output / "preference-data"
        if target.exists():  # an interrupted save: sampling is redone from the same seeds
            shutil.rmtree(target)
        return build_preference_data(self.output, target, self.settings.data, progress=self.progress)

    def _clip(self) -> dict[str, Any]:
        return pretrain_toy_clip(self.output / "clip", self.settings.clip, progress=self.progress, resume=True)

    def _train_and_place(self, run: Path, settings: PreferenceTraining, overrides: list[str], saved: str,
                         marker: str, target: Path) -> dict[str, Any]:
        """Run ``spo train-spm`` into ``run`` unless its final model ``run/saved`` is complete (the
        file ``marker`` is written last), then move a copy into ``target`` with one rename."""
        if not (run / saved / marker).exists():
            _train_spm(run, _train_spm_overrides(self.output, settings, overrides, self.settings.pretrain.seed),
                       self.progress)
        with atomic_directory(target) as staging:
            shutil.copytree(run / saved, staging)
        return {"run": str(run), "validation": _read_validation(run)}

    def _pickscore(self) -> dict[str, Any]:
        # save_clip writes preprocessor_config.json last
        return self._train_and_place(self.output / "pickscore-run", self.settings.pickscore, [
            f"preference.pretrained={self.output / 'clip'}", "preference.variant=clean",
        ], "reward", "preprocessor_config.json", self.output / "pickscore")

    def _spm(self) -> dict[str, Any]:
        # StepAwarePreferenceModel.save writes spm_config.json last
        return self._train_and_place(self.output / "spm-run", self.settings.spm, [
            f"model.pretrained={self.output / 'base'}", f"preference.pretrained={self.output / 'pickscore'}",
            "preference.variant=step_aware",
        ], "spm", "spm_config.json", self.output / "spm")

    def _check_found(self, stage: str) -> None:
        """Outputs made by an earlier command must come from the settings of this build."""
        source, wanted = {
            "pretrain": (self.output / "pretrain.json", self.record["settings"]["pretrain"]),
            "data": (self.output / "preference-data" / "statistics.json", self.record["settings"]["data"]),
            "clip": (self.output / "clip" / "toy_clip.json", self.record["settings"]["clip"]),
        }.get(stage, (None, None))
        if source is None:
            return
        try:
            found = json.loads(source.read_text()).get("settings")
        except (OSError, ValueError) as err:
            raise BuildError(f"{source} is unreadable ({err}); remove the {stage} stage's output to rebuild it") from None
        if found != wanted:
            raise BuildError(f"{source} was made with other settings than this build's {stage} stage "
                             f"({found} vs {wanted}); use another --output")

    def run(self, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
        """Run the unfinished ``stages`` in order; returns the record (also in build.json)."""
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise BuildError(f"unknown stages {unknown}; the stages are {list(STAGES)}")
        for stage in STAGES:
            if stage not in stages:
                continue
            entry = self.record["stages"].get(stage)
            if self.done(stage):
                if entry is None:  # finished by an earlier command (e.g. `spo toy pretrain`)
                    self._check_found(stage)
                    self.record["stages"][stage] = {"status": "found", "seconds": self._found_seconds(stage)}
                    self._save_record()
                self.log(f"[{stage}] finished earlier: kept")
                continue
            self.log(f"[{stage}] running")
            start = time.perf_counter()
            summary = getattr(self, f"_{stage}")()
            self.record["stages"][stage] = {"status": "built", "seconds": round(time.perf_counter() - start, 1),
                                            "summary": summary}
            self._save_record()
        return self.record

    def _found_seconds(self, stage: str) -> float | None:
        source = {"pretrain": self.output / "pretrain.json", "data": self.output / "preference-data" / "statistics.json",
                  "clip": self.output / "clip" / "toy_clip.json"}.get(stage)
        if source is None or not source.exists():
            return None
        return json.loads(source.read_text()).get("seconds")


def format_build_summary(record: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary rows: each stage's wall time, the preference data's label statistics, accuracies."""
    rows: list[tuple[str, str]] = []
    stages = record.get("stages", {})
    for stage in STAGES:
        entry = stages.get(stage)
        if entry is None:
            rows.append((f"{stage}", "not run"))
            continue
        seconds = entry.get("seconds")
        how = "built now" if entry["status"] == "built" else "found, built earlier"
        rows.append((f"{stage}", f"{how}, {seconds:.1f} s" if seconds is not None else how))
    data = stages.get("data", {}).get("summary")
    if data:
        labels = data["labels"]
        rows.append(("preference pairs (train / validation)", f"{data['rows']['train']} / {data['rows']['validation_unique']}"))
        rows.append(("tie rate", f"{labels['tie_rate']:.3f}"))
        rows.append(("generic label vs aesthetic-only: disagreement",
                     f"{labels['disagreement_with_aesthetic']:.3f} (of {labels['pairs_compared_aesthetic']} pairs)"))
    for stage in ("pickscore", "spm"):
        validation = stages.get(stage, {}).get("summary", {}).get("validation")
        if validation:
            rows.append((f"{stage} validation accuracy",
                         ", ".join(f"{k.removeprefix('accuracy_')}: {v:.3f}" for k, v in validation.items())))
    return rows
