"""One self-contained HTML page for a training run: ``write_report(run_dir)``.

The page reads what a run directory holds (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``lora/``, preview PNGs under ``samples/`` or ``validation/``) and the evaluations next to it
(directories with an ``eval.json`` in the ``spo-eval/1`` format), and shows:

* **Summary**: method, model, rounds and steps done, wall time, the first and last round's numbers;
* **Training curves**: whichever of the method's step and round metrics exist (SPO, D3PO, DDPO and
  Diffusion-DPO log different keys; unknown numeric keys get a plot of their own);
* **Preference score per timestep** over rounds (``score_mean_per_t``, ``trajectory_score_per_t``);
* **Preview samples**: the trainer's preview grids (``samples/reference.png``, then
  ``samples/round-NNNNNN.png``: :mod:`spo.training.previews`) as one strip over rounds, scrolled
  sideways, at most :data:`STRIP_ROUNDS` rounds evenly spaced with the first and the last; any
  other PNG there, the latest few; **Evaluation** (protocol, per-model tables with 95 % intervals
  and the paired difference vs base, skipped scorers, grids) and **Configuration**.

Everything is inline: CSS, SVG plots (:mod:`spo.evaluation.svg`), images as base64 ``data:`` URIs
(grids wider than :data:`MAX_IMAGE_WIDTH` px are downscaled), no script, no external reference.
The file is written atomically (:func:`spo.files.atomic_write_text`, flushed to the disk).
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from ..objectives import Curve
from ..registry import METHODS
from .svg import escape, finite, line_plot, per_timestep_plot, pick_evenly

#: the eval.json format this page reads
EVAL_FORMAT = "spo-eval/1"
#: embedded images wider than this are downscaled (keeps the page a reasonable size)
MAX_IMAGE_WIDTH = 1600
#: where preview samples may be, under the run directory
SAMPLE_DIRS = ("samples", "validation")
#: how many of the latest preview PNGs the page shows (other than the trainer's preview grids)
LATEST_SAMPLES = 4
#: the trainer's preview grids under ``samples/`` (names of spo.training.previews: this module
#: imports no torch): the reference model's, and the policy's after NNNNNN rounds
PREVIEW_REFERENCE = "reference.png"
PREVIEW_ROUND = re.compile(r"round-(\d{6})\.png")
#: the strip of previews shows at most this many rounds (evenly spaced, first and last included)
STRIP_ROUNDS = 8
#: keys of metrics.jsonl lines that are bookkeeping, not metrics to plot
BOOKKEEPING = frozenset({"type", "step", "round", "num_processes", "records_per_process", "skipped", "optimizer_steps",
                         "pairs"})
#: the per-timestep dictionaries of a round line, and what they mean
PER_T = {
    "score_mean_per_t": ("Mean score of all pool candidates per timestep",
                         "the preference model's mean score over every candidate of the pools branching at t"),
    "trajectory_score_per_t": ("Score of the continuing trajectory per timestep",
                               "the preference model's score of the candidate the rollout continues from, at t"),
}
_NON_FINITE = {"nan": math.nan, "NaN": math.nan, "inf": math.inf, "Infinity": math.inf, "-inf": -math.inf,
               "-Infinity": -math.inf}


#: the report's own plots: the loss leads, each method's module adds its own (``Method.curves``)
LOSS_CURVE = Curve("loss", "Loss", "loss", ("loss",))
#: ... and these follow: what every method's rounds log
ROUND_CURVES = (
    Curve("valid_pair_rate", "Valid-pair rate", "share of units", ("valid_pair_rate",), source="round"),
    Curve("score", "Preference score per round", "score", ("score_mean", "final_score", "reward_mean"), source="round"),
    Curve("score_std", "Score spread per round", "standard deviation", ("score_std", "reward_std"), source="round"),
    Curve("records", "Units drawn and training records per round", "count", ("pools", "valid_records"), source="round",
          smooth=False),
    Curve("seconds", "Seconds per round", "seconds", ("sampling_seconds", "training_seconds", "preview_seconds"),
          source="round", smooth=False),
    Curve("lr", "Learning rate", "lr", ("lr",), smooth=False),
    Curve("grad_norm", "Gradient norm (before clipping)", "norm", ("grad_norm",)),
)


def training_curves() -> tuple[Curve, ...]:
    """The training plots in page order: the loss, every registered method's own curves
    (``Method.curves``; one plot per ``plot_id``, holding the keys of every method that draws
    it: a run's metrics hold its own method's keys, and lines of another method's in the same
    file still get their plot), then the round curves."""
    merged: dict[str, Curve] = {}
    for name in METHODS.names():
        for curve in METHODS.get(name).curves:
            known = merged.get(curve.plot_id)
            keys = tuple(dict.fromkeys((*known.keys, *curve.keys))) if known else curve.keys
            merged[curve.plot_id] = replace(known or curve, keys=keys)
    return (LOSS_CURVE, *merged.values(), *ROUND_CURVES)


class Markup(str):
    """HTML that is already escaped (table cells of this type are not escaped again)."""


# ---------------------------------------------------------------------------------------- reading
@dataclass
class RunData:
    """What the report reads from a run directory."""

    run_dir: Path
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    unreadable_lines: int = 0


def _restore(value: Any) -> Any:
    """Undo metrics.jsonl's JSON-safe spelling of non-finite floats (``"nan"``, ``"inf"``)."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    return value


def read_metrics_lines(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(step lines, round lines, unreadable lines) of a ``metrics.jsonl``; a line cut by an
    interruption is counted, not fatal; a repeated step or round keeps its last line."""
    steps: dict[int, dict[str, Any]] = {}
    rounds: dict[int, dict[str, Any]] = {}
    bad = 0
    if not path.is_file():
        return [], [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(entry, dict):
            bad += 1
            continue
        entry = _restore(entry)
        kind = entry.get("type")
        index = entry.get(kind) if kind in ("step", "round") else None
        if isinstance(index, bool) or not isinstance(index, (int, float)):
            continue
        (steps if kind == "step" else rounds)[int(index)] = entry
    return [steps[k] for k in sorted(steps)], [rounds[k] for k in sorted(rounds)], bad


def load_run(run_dir: Path) -> RunData:
    """The config (text and parsed) and metrics of ``run_dir``; missing files give empty parts."""
    import yaml

    data = RunData(run_dir)
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        data.config_text = config_path.read_text(errors="replace")
        try:
            parsed = yaml.safe_load(data.config_text)
        except yaml.YAMLError:
            parsed = None
        data.config = parsed if isinstance(parsed, dict) else {}
    data.steps, data.rounds, data.unreadable_lines = read_metrics_lines(run_dir / "metrics.jsonl")
    return data


def find_eval_dirs(run_dir: Path, extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Every direct subdirectory of ``run_dir`` with an ``eval.json``, then the ``extra`` ones
    (each must hold an ``eval.json``), without repeats."""
    found = [d for d in sorted(run_dir.iterdir()) if d.is_dir() and (d / "eval.json").is_file()]
    for d in map(Path, extra):
        if not (d / "eval.json").is_file():
            raise FileNotFoundError(f"{d}: no eval.json there (give a directory written by the evaluation)")
        found.append(d)
    unique: dict[Path, Path] = {}
    for d in found:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


# ---------------------------------------------------------------------------------------- formatting
def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: ints as they are, floats to ``digits`` significant digits."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def fmt_seconds(seconds: float) -> str:
    """``12.3 s``, ``4 min 58 s``, ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _cell(value: Any) -> str:
    return value if isinstance(value, Markup) else escape(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """An HTML table; cells are escaped unless they are :class:`Markup`."""
    head = "".join(f"<th>{_cell(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{escape(cls)}"' if cls else ""
    return f"<table{attr}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{escape(text)}</p>'


# ---------------------------------------------------------------------------------------- images
def image_data_uri(path: Path, max_width: int = MAX_IMAGE_WIDTH) -> tuple[str, int, int]:
    """``(data URI, width, height)`` of the PNG encoding of the image at ``path``, downscaled
    to ``max_width`` px wide when wider (a PNG that fits is embedded as its own bytes)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.format == "PNG" and im.width <= max_width:
            payload, size = path.read_bytes(), im.size
        else:
            if im.mode not in ("RGB", "RGBA", "L", "LA"):
                im = im.convert("RGBA")
            if im.width > max_width:
                im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.LANCZOS)
            buffer = io.BytesIO()
            im.save(buffer, "PNG")
            payload, size = buffer.getvalue(), im.size
    return "data:image/png;base64," + base64.b64encode(payload).decode("ascii"), size[0], size[1]


def figure_img(path: Path, caption: str, *, enlarge: bool = True) -> str:
    """A ``<figure>`` with the image embedded, or a note when it cannot be read; ``enlarge``: show
    an image under 160 px wide up to 4x (a tiny preview)."""
    if not path.is_file():
        return note(f"missing image: {path}", "note warn")
    try:
        uri, w, h = image_data_uri(path)
    except (OSError, ValueError) as exc:
        return note(f"unreadable image {path}: {exc}", "note warn")
    style = f' style="width:{w * min(4, 320 // w)}px"' if enlarge and w < 160 else ""  # tiny previews, up to 4x
    return (f'<figure class="image"><img src="{uri}" width="{w}" height="{h}"{style} alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


# ---------------------------------------------------------------------------------------- series
def _numeric_keys(lines: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys with a number in at least one line, in first-seen order, bookkeeping left out."""
    keys: dict[str, None] = {}
    for line in lines:
        for k, v in line.items():
            if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k)
    return list(keys)


def _count(lines: Sequence[Mapping[str, Any]], key: str) -> int:
    return sum(1 for line in lines if finite(line.get(key)) is not None)


def _xy(lines: Sequence[Mapping[str, Any]], x_key: str, key: str) -> tuple[list[Any], list[Any]]:
    rows = [line for line in lines if key in line]
    return [line.get(x_key) for line in rows], [line.get(key) for line in rows]


def smoothing_window(n: int) -> int:
    """The moving-average window for ``n`` points (none below 30 points)."""
    return 0 if n < 30 else max(3, min(101, n // 25))


def curve_svg(curve: Curve, run: RunData) -> str | None:
    """The plot of ``curve`` from the step or round lines, or ``None`` when none of its keys exist."""
    use_steps = curve.source == "auto" and any(_count(run.steps, k) >= 2 for k in curve.keys)
    if not use_steps and not any(_count(run.rounds, k) for k in curve.keys):
        use_steps = curve.source == "auto" and any(_count(run.steps, k) for k in curve.keys)
    lines, x_key = (run.steps, "step") if use_steps else (run.rounds, "round")
    keys = [k for k in curve.keys if _count(lines, k)]
    if not keys:
        return None
    series = {k: _xy(lines, x_key, k) for k in keys}
    n = max(len(xs) for xs, _ in series.values())
    smooth = smoothing_window(n) if curve.smooth else 0
    xlabel = "optimiser step" if use_steps else "round"
    if smooth:
        xlabel += f" (line: moving average over {smooth})"
    return line_plot(series, curve.title, xlabel, curve.ylabel, smooth=smooth, reference=curve.reference,
                     plot_id=curve.plot_id)


def training_plots(run: RunData) -> list[str]:
    """Every plot of :func:`training_curves` that has data, then one per other numeric key."""
    curves = training_curves()
    plots = [svg for svg in (curve_svg(c, run) for c in curves) if svg]
    covered = {k for c in curves for k in c.keys}
    for key in _numeric_keys(run.steps + run.rounds):
        if key not in covered:
            extra = Curve(f"other-{key}", key.replace("_", " "), key, (key,))
            svg = curve_svg(extra, run)
            if svg:
                plots.append(svg)
    return plots


def per_t_rows(rounds: Sequence[Mapping[str, Any]], key: str) -> dict[int, dict[float, Any]]:
    """``{round: {t: value}}`` of the round lines holding the dictionary ``key``."""
    rows: dict[int, dict[float, Any]] = {}
    for line in rounds:
        values = line.get(key)
        if not isinstance(values, dict) or not values:
            continue
        parsed = {}
        for t, v in values.items():
            try:
                parsed[float(t)] = v
            except ValueError:
                continue
        if parsed:
            rows[int(line["round"])] = parsed
    return rows


# ---------------------------------------------------------------------------------------- sections
def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{escape(section_id)}">\n<h2>{escape(title)}</h2>\n{body}\n</section>'


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _model_text(config: Mapping[str, Any]) -> str:
    backbone, pretrained = _get(config, "model.backbone"), _get(config, "model.pretrained")
    text = " ".join(str(v) for v in (backbone, pretrained and f"({pretrained})") if v) or "\u2014"
    revision = _get(config, "model.revision")
    return f"{text} @ {revision}" if revision else text


def _finetune_text(config: Mapping[str, Any]) -> str:
    mode = _get(config, "model.finetune")
    if mode == "lora":
        return f"LoRA rank {_get(config, 'lora.rank')}, alpha {_get(config, 'lora.alpha')}"
    return str(mode) if mode else "\u2014"


def _status_text(run_dir: Path) -> str:
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("round-*") if p.is_dir()) \
        if (run_dir / "checkpoints").is_dir() else []
    final = [p for p in (run_dir / "lora" / "pytorch_lora_weights.safetensors", run_dir / "unet") if p.exists()]
    if final:
        state = f"finished: final weights in {final[0].relative_to(run_dir)}"
    else:
        state = "in progress or interrupted (no final weights yet)"
    if checkpoints:
        state += f"; latest checkpoint {checkpoints[-1]}"
    return state


def summary_facts(run: RunData, n_evals: int) -> list[tuple[str, Any]]:
    """The (name, value) rows of the summary's facts table."""
    cfg, rounds, steps = run.config, run.rounds, run.steps
    planned = _get(cfg, "train.rounds")
    done = len(rounds)
    skipped = sum(1 for r in rounds if r.get("skipped") is True)
    opt_steps = max((int(s["step"]) for s in steps), default=None)
    if opt_steps is None and rounds:
        opt_steps = int(sum(finite(r.get("optimizer_steps")) or 0 for r in rounds))
    sampling = sum(finite(r.get("sampling_seconds")) or 0.0 for r in rounds)
    training = sum(finite(r.get("training_seconds")) or 0.0 for r in rounds)
    previews = sum(finite(r.get("preview_seconds")) or 0.0 for r in rounds)
    facts: list[tuple[str, Any]] = [
        ("Method", _get(cfg, "objective.name") or "unknown (no config.yaml)"),
        ("Model", _model_text(cfg)),
        ("Fine-tuning", _finetune_text(cfg)),
        ("Prompts / data", _get(cfg, "data.prompts") or "\u2014"),
        ("Rounds done", f"{done}" + (f" of {planned}" if planned is not None else "")
         + (f" ({skipped} skipped)" if skipped else "")),
        ("Optimiser steps", opt_steps if opt_steps is not None else "\u2014"),
        ("Wall time (rounds)", f"{fmt_seconds(sampling + training + previews)} (sampling {fmt_seconds(sampling)}, "
                               f"training {fmt_seconds(training)}"
                               + (f", previews {fmt_seconds(previews)})" if previews else ")") if rounds else "\u2014"),
        ("Processes", (rounds or steps or [{}])[-1].get("num_processes", _get(cfg, "train.num_processes")) or "\u2014"),
        ("Status", _status_text(run.run_dir)),
        ("Evaluations", n_evals),
    ]
    if run.unreadable_lines:
        facts.append(("Unreadable metrics lines", run.unreadable_lines))
    return facts


def final_metrics_rows(rounds: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(metric, first round, last round) for the scalar metrics of the round lines (rounds
    that trained preferred: a skipped round has no loss)."""
    trained = [r for r in rounds if r.get("skipped") is not True] or list(rounds)
    first, last = trained[0], trained[-1]
    order = [k for c in training_curves() for k in c.keys]
    keys = _numeric_keys(trained)
    keys.sort(key=lambda k: order.index(k) if k in order else len(order))
    return [(k, fmt(first.get(k)), fmt(last.get(k))) for k in keys]


def summary_section(run: RunData, n_evals: int) -> str:
    parts = [table(("", ""), summary_facts(run, n_evals), "facts")]
    if run.rounds:
        trained = [r for r in run.rounds if r.get("skipped") is not True] or run.rounds
        parts.append("<h3>Round metrics</h3>")
        parts.append(table(("metric", f"round {trained[0].get('round')} (first)", f"round {trained[-1].get('round')} (last)"),
                           final_metrics_rows(run.rounds), "numbers"))
    else:
        parts.append(note("No metrics yet: metrics.jsonl has no round line (the run has not finished a round)."))
    return section("summary", "Summary", "\n".join(parts))


def curves_section(run: RunData) -> str:
    if not run.steps and not run.rounds:
        body = note("No metrics yet: metrics.jsonl is missing or empty, so there is nothing to plot.")
    else:
        plots = training_plots(run)
        hint = ('<p class="hint">Step metrics are drawn faint with their moving average over them; dashed lines mark '
                "chance (accuracy 0.5), zero or a ratio of 1.</p>")
        figures = "\n".join(f'<figure class="plot">{p}</figure>' for p in plots)
        body = f'{hint}\n<div class="plots">\n{figures}\n</div>' if plots else note("The metrics lines hold no number to plot.")
    return section("training-curves", "Training curves", body)


def per_t_section(run: RunData) -> str:
    parts = []
    for key, (title, meaning) in PER_T.items():
        rows = per_t_rows(run.rounds, key)
        if rows:
            svg = per_timestep_plot(rows, title, "score", plot_id=key)
            parts.append(f'<figure class="plot">{svg}<figcaption><code>{escape(key)}</code>: {escape(meaning)}; one '
                         f"line per selected round, early rounds purple, late rounds yellow.</figcaption></figure>")
    if not parts:
        method = _get(run.config, "objective.name") or "this run"
        return section("per-timestep", "Preference score per timestep",
                       note(f"No per-timestep scores: {method} logs none yet (SPO and D3PO round lines hold "
                            "score_mean_per_t and trajectory_score_per_t)."))
    return section("per-timestep", "Preference score per timestep", '<div class="plots">' + "\n".join(parts) + "</div>")


def preview_rounds(run_dir: Path) -> dict[int, Path]:
    """``{rounds done: path}`` of the trainer's preview grids (``samples/round-NNNNNN.png``), in round order."""
    directory = run_dir / SAMPLE_DIRS[0]
    found = {}
    if directory.is_dir():
        for path in directory.iterdir():
            match = PREVIEW_ROUND.fullmatch(path.name)
            if match and path.is_file():
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def preview_strip(run_dir: Path, count: int = STRIP_ROUNDS) -> tuple[list[tuple[str, Path]], int]:
    """The strip's (caption, path): the reference grid first (when there), then at most ``count``
    rounds' grids evenly spaced (first and last included); and how many rounds have one."""
    rounds = preview_rounds(run_dir)
    strip = [(f"after {r} round" + ("" if r == 1 else "s"), rounds[r]) for r in pick_evenly(list(rounds), count)]
    reference = run_dir / SAMPLE_DIRS[0] / PREVIEW_REFERENCE
    if reference.is_file():
        strip.insert(0, ("reference", reference))
    return strip, len(rounds)


def latest_samples(run_dir: Path, count: int = LATEST_SAMPLES, *, exclude: Iterable[Path] = ()) -> list[Path]:
    """The newest ``count`` PNGs under the run's sample directories, oldest first (``exclude``:
    the preview grids the strip shows)."""
    skip = set(exclude)
    found = [p for d in SAMPLE_DIRS if (run_dir / d).is_dir() for p in (run_dir / d).rglob("*.png")
             if p.is_file() and p not in skip]
    found.sort(key=lambda p: (p.stat().st_mtime, str(p)))
    return found[-count:] if count > 0 else []


def samples_section(run: RunData) -> str:
    strip, n_rounds = preview_strip(run.run_dir)
    previews = {*preview_rounds(run.run_dir).values(), *(path for _, path in strip)}  # all, shown or not
    others = latest_samples(run.run_dir, exclude=previews)
    every = _get(run.config, "logging.sample_every")
    if not strip and not others:
        return section("samples", "Preview samples",
                       note(f"No preview images under {' or '.join(d + '/' for d in SAMPLE_DIRS)} "
                            f"(logging.sample_every = {every if every is not None else 'unset'})."))
    parts = []
    if strip:
        shown = sum(1 for caption, _ in strip if caption != "reference")
        which = (f"every round with a preview ({n_rounds})" if shown == n_rounds else
                 f"{shown} of the {n_rounds} rounds with a preview, evenly spaced, the first and the last included")
        first = "the reference model's first; " if strip[0][0] == "reference" else ""
        parts.append(f'<p class="hint">The policy\'s previews drawn while training (logging.sample_every = '
                     f"{escape(every if every is not None else 'unset')}): the same prompts from the same noise each "
                     f"time, {first}{escape(which)}. Scroll sideways for later rounds.</p>")
        figures = "\n".join(figure_img(path, caption, enlarge=False) for caption, path in strip)  # cells 128+ px
        parts.append(f'<div class="strip">\n{figures}\n</div>')
    if others:
        figures = "\n".join(figure_img(p, str(p.relative_to(run.run_dir))) for p in others)
        parts.append(("<h3>Other images</h3>" if strip else "") + f'<div class="images">{figures}</div>')
    return section("samples", "Preview samples", "\n".join(parts))


# ---------------------------------------------------------------------------------------- evaluation
def _value_text(value: Any, limit: int = 12) -> str:
    if isinstance(value, list):
        shown = ", ".join(str(v) for v in value[:limit])
        return f"{shown}, \u2026 ({len(value)} in all)" if len(value) > limit else shown
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return fmt(value)


def interval_text(est: Mapping[str, Any] | None, signed: bool = False) -> str:
    """``mean [low, high]`` of an estimate, ``+`` signed for a difference."""
    if not isinstance(est, Mapping):
        return "\u2014"
    mean = finite(est.get("mean"))
    text = (f"{mean:+.4g}" if signed else f"{mean:.4g}") if mean is not None else fmt(est.get("mean"))
    low, high = finite(est.get("low")), finite(est.get("high"))
    if low is not None and high is not None:
        text += f" [{low:+.4g}, {high:+.4g}]" if signed else f" [{low:.4g}, {high:.4g}]"
    return text


def difference_class(est: Mapping[str, Any] | None, higher_is_better: bool = True) -> str:
    """``better`` / ``worse`` when the interval excludes 0 (by the metric's direction), else ``ns``."""
    if not isinstance(est, Mapping):
        return "ns"
    low, high = finite(est.get("low")), finite(est.get("high"))
    if low is None or high is None or low <= 0 <= high:
        return "ns"
    return "better" if (low > 0) == higher_is_better else "worse"


def difference_cell(est: Mapping[str, Any] | None, higher_is_better: bool) -> Markup:
    cls = difference_class(est, higher_is_better)
    mark = {"better": " \u25b2", "worse": " \u25bc", "ns": ""}[cls]
    return Markup(f'<span class="diff {cls}">{escape(interval_text(est, signed=True))}{mark}</span>')


def _metric_info(ev: Mapping[str, Any], metric: str) -> Mapping[str, Any]:
    info = (ev.get("metrics") or {}).get(metric)
    return info if isinstance(info, Mapping) else {}


def _eval_metrics(ev: Mapping[str, Any]) -> list[str]:
    names: dict[str, None] = dict.fromkeys(ev.get("metrics") or {})
    for per_model in (ev.get("results") or {}).values():
        if isinstance(per_model, Mapping):
            names.update(dict.fromkeys(per_model))
    return list(names)


def model_table(ev: Mapping[str, Any], model: str) -> str:
    """One model's table: per metric its mean [95 % interval], n, the paired difference vs base."""
    results = (ev.get("results") or {}).get(model) or {}
    diffs = (ev.get("differences") or {}).get(model) or {}
    rows = []
    for metric in _eval_metrics(ev):
        info = _metric_info(ev, metric)
        est = results.get(metric) if isinstance(results, Mapping) else None
        better = info.get("higher_is_better", True) is not False
        diff = difference_cell(diffs.get(metric), better) if model != "base" else Markup('<span class="diff ns">reference</span>')
        rows.append((info.get("label") or metric, interval_text(est), fmt((est or {}).get("n")), diff,
                     info.get("expected_range", "\u2014"), "higher" if better else "lower"))
    return table(("metric", "mean [95% interval]", "n", "paired difference vs base", "expected range", "better"), rows,
                 "numbers results")


def differences_table(ev: Mapping[str, Any], models: Sequence[str]) -> str:
    """The paired differences vs base of several models side by side."""
    rows = []
    for metric in _eval_metrics(ev):
        info = _metric_info(ev, metric)
        better = info.get("higher_is_better", True) is not False
        rows.append([info.get("label") or metric]
                    + [difference_cell(((ev.get("differences") or {}).get(m) or {}).get(metric), better) for m in models])
    return table(["metric"] + [f"{m} \u2212 base" for m in models], rows, "numbers compare")


def _models_rows(ev: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    rows = []
    for name, info in (ev.get("models") or {}).items():
        info = info if isinstance(info, Mapping) else {}
        weights = info.get("lora") or (f"UNet: {info['unet']}" if info.get("unet") else None)  # a fine-tuned pipeline's
        rows.append((name, fmt(info.get("pretrained")), fmt(weights), fmt(info.get("run")), fmt(info.get("method"))))
    return rows


def eval_block(directory: Path, run_dir: Path, index: int) -> str:
    """One evaluation: protocol, models, tables, skipped scorers, files, grids."""
    try:
        title = str(directory.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        title = str(directory)
    head = f'<article class="eval" id="eval-{index}">\n<h3>Evaluation: {escape(title)}</h3>'
    try:
        ev = json.loads((directory / "eval.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{head}\n{note(f'unreadable eval.json: {exc}', 'note warn')}\n</article>"
    if not isinstance(ev, dict) or ev.get("format") != EVAL_FORMAT or not isinstance(ev.get("results"), dict):
        found = ev.get("format", "none") if isinstance(ev, dict) else type(ev).__name__
        message = f"eval.json is not in the {EVAL_FORMAT} format (format: {found}); re-run the evaluation."
        return f"{head}\n{note(message, 'note warn')}\n</article>"
    protocol = [(k, _value_text(v)) for k, v in (ev.get("protocol") or {}).items()]
    parts = [head, "<h4>Protocol</h4>", table(("setting", "value"), protocol, "facts")]
    parts += ["<h4>Models</h4>", table(("model", "pretrained", "LoRA", "run", "method"), _models_rows(ev))]
    models = list(ev["results"])
    others = [m for m in models if m != "base"]
    if len(others) > 1:
        parts += ["<h4>Paired differences vs base, side by side</h4>", differences_table(ev, others)]
    parts.append('<p class="hint">Means with 95% intervals; the paired difference is model \u2212 base over the same '
                 '(prompt, seed), green \u25b2 / red \u25bc when its interval excludes 0 (better / worse by the '
                 "metric's direction), grey otherwise.</p>")
    for model in (["base"] if "base" in models else []) + others:
        parts += [f"<h4>Model: {escape(model)}</h4>", model_table(ev, model)]
    skipped = ev.get("skipped") or []
    parts.append("<h4>Skipped scorers</h4>" + (
        "<ul>" + "".join(f"<li>{escape(s)}</li>" for s in skipped) + "</ul>" if skipped else note("none")))
    parts.append(_eval_files(ev))
    parts.append(_eval_grids(ev, directory))
    parts.append("</article>")
    return "\n".join(parts)


def _eval_files(ev: Mapping[str, Any]) -> str:
    rows = [(k, v) for k, v in (ev.get("files") or {}).items()]
    rows += [(f"{k} seconds", fmt_seconds(float(v))) for k, v in (ev.get("seconds") or {}).items() if finite(v) is not None]
    return "<h4>Files and timing</h4>" + table(("item", "value"), rows, "facts") if rows else ""


def _eval_grids(ev: Mapping[str, Any], directory: Path) -> str:
    grids = ev.get("grids") or {}
    figures = []
    for model, paths in grids.items():
        for rel in paths if isinstance(paths, list) else [paths]:
            figures.append(figure_img(directory / str(rel), f"{model}: {rel}"))
    if not figures:
        return "<h4>Grids</h4>" + note("no grid images")
    return '<h4>Grids</h4>\n<div class="images">' + "\n".join(figures) + "</div>"


def evaluation_section(eval_dirs: Sequence[Path], run_dir: Path) -> str:
    if not eval_dirs:
        return section("evaluation", "Evaluation",
                       note("No evaluation: no subdirectory of the run holds an eval.json, and none was given."))
    return section("evaluation", "Evaluation", "\n".join(eval_block(d, run_dir, i) for i, d in enumerate(eval_dirs, 1)))


def config_section(run: RunData) -> str:
    if run.config_text is None:
        return section("configuration", "Configuration", note("No config.yaml in the run directory."))
    return section("configuration", "Configuration", f"<pre>{escape(run.config_text)}</pre>")


# ---------------------------------------------------------------------------------------- page
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;
background:#f6f7f9;line-height:1.45}
header{background:#23395d;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:1.5em}
header p{margin:0;opacity:.85;font-size:.9em;word-break:break-all}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #dde1e6;padding:8px 28px;z-index:1}
nav a{margin-right:16px;color:#23395d;text-decoration:none;font-weight:600}
main{max-width:1280px;margin:0 auto;padding:8px 28px 40px}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;margin:20px 0;padding:4px 22px 18px}
h2{border-bottom:2px solid #23395d;padding-bottom:4px}
h3{margin-top:22px}
h4{margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.92em}
th,td{border:1px solid #dde1e6;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef1f5}
table.facts td:first-child{font-weight:600;background:#f8f9fb}
table.facts thead{display:none}
table.numbers td{font-variant-numeric:tabular-nums}
.diff.better{color:#116b2d;font-weight:600}
.diff.worse{color:#b3261e;font-weight:600}
.diff.ns{color:#666}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px}
figure{margin:0}
figure.plot{border:1px solid #eceff3;border-radius:6px;padding:4px}
svg.plot{width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#555;padding:2px 6px}
.images{display:flex;flex-wrap:wrap;align-items:flex-start;gap:14px}
.strip{display:flex;flex-wrap:nowrap;overflow-x:auto;align-items:flex-start;gap:12px;padding-bottom:8px}
.strip figure.image{flex:0 0 auto}
.strip figure.image img{max-width:none}
figure.image img{max-width:100%;height:auto;image-rendering:pixelated;border:1px solid #dde1e6;display:block}
pre{background:#f3f4f6;border:1px solid #dde1e6;border-radius:6px;padding:12px;overflow:auto;font-size:.9em}
.note{color:#555;font-style:italic}
.note.warn{color:#8a5300}
.hint{color:#555;font-size:.9em}
article.eval+article.eval{border-top:1px dashed #c8cdd4;margin-top:18px}
"""

SECTIONS = (("summary", "Summary"), ("training-curves", "Training curves"), ("per-timestep", "Score per timestep"),
            ("samples", "Samples"), ("evaluation", "Evaluation"), ("configuration", "Configuration"))


def render_report(run_dir: Path, eval_dirs: Sequence[Path]) -> str:
    """The page's HTML."""
    run = load_run(run_dir)
    name = run_dir.resolve().name
    method = _get(run.config, "objective.name")
    title = f"{method.upper() if isinstance(method, str) else 'Training'} run report: {name}"
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    nav = "".join(f'<a href="#{sid}">{escape(label)}</a>' for sid, label in SECTIONS)
    body = [summary_section(run, len(eval_dirs)), curves_section(run), per_t_section(run), samples_section(run),
            evaluation_section(eval_dirs, run_dir), config_section(run)]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<header><h1>{escape(title)}</h1><p>{escape(str(run_dir.resolve()))} \u00b7 generated {escape(generated)}</p></header>",
        f"<nav>{nav}</nav>", "<main>", *body, "</main>", "</body>", "</html>", "",
    ])


def write_report(
    run_dir: str | os.PathLike[str],
    *,
    eval_dirs: Sequence[str | os.PathLike[str]] = (),
    output: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the run's self-contained HTML report and return its path.

    Args:
        run_dir: a training run directory (``config.yaml``, ``metrics.jsonl``, ...); a run with
            no metrics yet still gives a page (that says so).
        eval_dirs: evaluation directories (each with an ``eval.json``) to show besides every
            direct subdirectory of ``run_dir`` that holds one.
        output: the HTML file (default ``run_dir/report.html``); written atomically.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory, or a given eval dir has no eval.json.
    """
    run_path = Path(run_dir)
    if not run_path.is_dir():
        raise FileNotFoundError(f"{run_path}: no such run directory")
    out = Path(output) if output is not None else run_path / "report.html"
    html_text = render_report(run_path, find_eval_dirs(run_path, eval_dirs))
    atomic_write_text(out, html_text, fsync=True)
    return out
