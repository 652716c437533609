"""The run report (spo.evaluation.report) and its SVG plots (spo.evaluation.svg), on fake run
directories: a config, metrics of several methods, an eval dir in the spo-eval/1 format."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from spo.evaluation import svg
from spo.evaluation.report import write_report

SECTION_IDS = ("summary", "training-curves", "per-timestep", "samples", "evaluation", "configuration")
NASTY = '<script>alert("x")</script> & co'
VOID = {"meta", "img", "br", "hr", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}

STEP_KEYS = {
    "spo": ("loss", "ratio_win", "ratio_lose", "clamp_fraction", "reward_accuracy", "reward_margin"),
    "ddpo": ("loss", "ratio", "approx_kl", "clip_fraction", "advantage"),
    "diffusion_dpo": ("loss", "implicit_accuracy", "model_diff", "ref_diff", "err_win"),
}
COMMON_PLOTS = {"loss", "valid_pair_rate", "records", "seconds", "lr", "grad_norm", "other-my_custom_metric"}
EXPECTED_PLOTS = {
    "spo": COMMON_PLOTS | {"accuracy", "margin", "clamp", "ratio", "score", "score_std", "score_mean_per_t",
                           "trajectory_score_per_t"},
    "ddpo": COMMON_PLOTS | {"clamp", "ratio", "approx_kl", "advantage", "score", "score_std"},
    "diffusion_dpo": COMMON_PLOTS | {"accuracy", "dpo_diffs", "err_win"},
}
EXPECTED_PLOTS["spo+ddpo"] = EXPECTED_PLOTS["spo"] | EXPECTED_PLOTS["ddpo"]


# ---------------------------------------------------------------------------------------- fixtures
def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = (200, 60, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, colour)
    for x in range(0, size[0], 8):  # some structure, so a resize has something to do
        for y in range(size[1]):
            im.putpixel((x, y), (20, 20, 20))
    im.save(path)
    return path


def _round_log(method: str, r: int) -> dict[str, Any]:
    ts = [751, 501, 251, 1]
    if method in ("spo", "d3po"):
        return {"score_mean": 1.0 + 0.3 * r, "score_std": 2.0, "final_score": 1.2 + 0.3 * r,
                "score_mean_per_t": {str(t): 0.5 + r * 0.3 + (751 - t) / 500 for t in ts},
                "trajectory_score_per_t": {str(t): 0.4 + r * 0.3 + (751 - t) / 400 for t in ts}}
    if method == "ddpo":
        return {"reward_mean": 0.2 * r, "reward_std": 1.0, "final_score": 0.2 * r}
    return {}


def metrics_lines(method: str, rounds: int = 6, steps_per_round: int = 8, first_round: int = 0) -> list[dict[str, Any]]:
    """Step and round lines as the trainer writes them for ``method`` (non-finite numbers as
    strings, as MetricsLog writes them)."""
    lines: list[dict[str, Any]] = []
    step = first_round * steps_per_round
    for r in range(first_round, first_round + rounds):
        step_values = []
        for i in range(steps_per_round):
            step += 1
            values = {k: math.sin(step * (j + 1)) * 0.1 + 0.5 for j, k in enumerate(STEP_KEYS[method])}
            step_values.append(values)
            lines.append({"type": "step", "step": step, "round": r, **values, "lr": 3e-4,
                          "grad_norm": "nan" if step == 3 else 0.1 + 0.01 * i, "pairs": 8, "num_processes": 1,
                          "my_custom_metric": step * 2.0})
        means = {k: sum(v[k] for v in step_values) / len(step_values) for k in STEP_KEYS[method]}
        lines.append({"type": "round", "round": r, "num_processes": 1, "valid_records": 30 + r, "records_per_process": [30 + r],
                      "pools": 64, "valid_pair_rate": 0.5 + 0.01 * r, **_round_log(method, r), "skipped": False,
                      "optimizer_steps": steps_per_round, "sampling_seconds": 3.25, "training_seconds": 1.5, **means})
    return lines


def _config_text(method: str) -> str:
    return (f"seed: 0\nmodel:\n  backbone: toy\n  pretrained: toy:base\n  finetune: lora\n"
            f"data:\n  prompts: '{NASTY}'\nobjective:\n  name: {method}\nlora:\n  rank: 4\n  alpha: 4.0\n"
            f"train:\n  rounds: 10\nlogging:\n  sample_every: 2\n")


def eval_json(models: tuple[str, ...] = ("spo",)) -> dict[str, Any]:
    """An eval.json in the spo-eval/1 format."""
    others = {m: {"pickscore": {"mean": 0.0712, "low": 0.0123, "high": 0.1301, "n": 72},
                  "aesthetic": {"mean": -0.0212, "low": -0.0534, "high": 0.0111, "n": 72},
                  "distance": {"mean": 0.25, "low": 0.125, "high": 0.375, "n": 72}} for m in models}
    return {
        "format": "spo-eval/1",
        "protocol": {"prompts": f"prompts {NASTY}.txt", "num_prompts": 24, "seeds": 3, "seed": 0, "num_inference_steps": 20,
                     "eta": 1.0, "guidance_scale": 5.0, "noise": "per_image"},
        "models": {"base": {"pretrained": "toy:base", "lora": None, "run": None, "method": None},
                   **{m: {"pretrained": "toy:base", "lora": f"runs/{m}/lora", "run": f"runs/{m}", "method": m} for m in models}},
        "metrics": {"pickscore": {"label": "PickScore", "expected_range": "about 5 to 25 (toy: 0 to 10)",
                                  "higher_is_better": True},
                    "aesthetic": {"label": "Aesthetic", "expected_range": "1 to 10", "higher_is_better": True},
                    "distance": {"label": "Distance", "expected_range": "0 to 1", "higher_is_better": False}},
        "skipped": ["HPSv2: no weights given (--scorer hpsv2=PATH_OR_HUB_ID)"],
        "results": {"base": {"pickscore": {"mean": 5.912, "low": 5.801, "high": 6.023, "n": 72},
                             "aesthetic": {"mean": 4.5, "low": 4.25, "high": 4.75, "n": 72},
                             "distance": {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 72}},
                    **{m: {"pickscore": {"mean": 5.983, "low": 5.871, "high": 6.094, "n": 72},
                           "aesthetic": {"mean": 4.48, "low": 4.23, "high": 4.73, "n": 72},
                           "distance": {"mean": 0.75, "low": 0.6, "high": 0.9, "n": 72}} for m in models}},
        "differences": others,
        "grids": {m: [f"grids/{m}-00.png", f"grids/{m}-wide.png"] for m in models},
        "files": {"scores": "scores.csv", "per_prompt": "per_prompt.csv"},
        "seconds": {"generation": 12.3, "scoring": 4.5},
    }


def make_run(root: Path, method: str = "spo", *, evaluation: bool = True, samples: bool = True,
             models: tuple[str, ...] = ("spo",)) -> Path:
    """A fake run directory; ``method`` "spo+ddpo" mixes both methods' lines in one metrics.jsonl."""
    run = root / "run"
    run.mkdir(parents=True)
    methods = method.split("+")
    (run / "config.yaml").write_text(_config_text(methods[0]))
    lines = []
    for i, m in enumerate(methods):
        lines += metrics_lines(m, first_round=6 * i)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + '{"type": "step", "step": 999, "lo')  # a line cut by an interruption
    (run / "checkpoints" / "round-000005").mkdir(parents=True)
    if samples:
        for i in range(6):
            path = _png(run / "samples" / f"round-{i:03d}.png", (64, 32), (40 * i, 100, 100))
            os.utime(path, (1_000_000 + i, 1_000_000 + i))
    if evaluation:
        ev = run / "eval"
        ev.mkdir()
        (ev / "eval.json").write_text(json.dumps(eval_json(models)))
        for m in models:
            _png(ev / "grids" / f"{m}-00.png", (96, 48))
            _png(ev / "grids" / f"{m}-wide.png", (2000, 100))
    return run


# ---------------------------------------------------------------------------------------- parsing
class Collector(HTMLParser):
    """Tags with their attributes, the text, and a check that elements nest properly."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []
        self.svgs: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "svg":
            self.svgs.append({"attrs": a, "polylines": [], "circles": 0})
        elif tag == "polyline" and "svg" in self.stack:
            self.svgs[-1]["polylines"].append(a.get("points", ""))
        elif tag == "circle" and "svg" in self.stack:
            self.svgs[-1]["circles"] += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        before = len(self.stack)
        self.handle_starttag(tag, attrs)
        if len(self.stack) > before:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html_text: str) -> Collector:
    c = Collector()
    c.feed(html_text)
    c.close()
    assert not c.errors, c.errors[:5]
    assert c.stack == [], c.stack
    return c


def _point_count(points: str) -> int:
    return len(re.findall(r"-?\d+(?:\.\d+)?,-?\d+(?:\.\d+)?", points))


# ---------------------------------------------------------------------------------------- report tests
def test_report_full_page(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    text = out.read_text()
    page = parse(text)
    ids = {a.get("id") for _, a in page.tags}
    assert set(SECTION_IDS) <= ids
    for sid in SECTION_IDS:
        assert re.search(rf'<section id="{sid}">\s*<h2>', text), sid
    # plots: one svg per expected plot, each with a line of points
    plots = [s["attrs"].get("data-plot") for s in page.svgs]
    assert sorted(plots) == sorted(EXPECTED_PLOTS["spo"])
    for s in page.svgs:
        assert any(_point_count(p) >= 2 for p in s["polylines"]), s["attrs"]
    # images: all embedded PNGs of the right size (the 2000 px grid downscaled to 1600)
    images = [a for t, a in page.tags if t == "img"]
    sizes = []
    for a in images:
        assert a["src"].startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        assert im.format == "PNG" and im.size == (int(a["width"]), int(a["height"]))
        sizes.append(im.size)
    assert sizes.count((64, 32)) == 4  # the latest 4 of 6 samples
    assert (96, 48) in sizes and (1600, 80) in sizes and len(sizes) == 6
    assert "samples/round-005.png" in text and "samples/round-001.png" not in text
    # nothing external, no script
    for bad in ("http://", "https://", 'src="/', "<script", "<link", "@import"):
        assert bad not in text.lower(), bad
    assert not any(t in ("script", "link", "iframe", "object") for t, _ in page.tags)
    # escaping: the nasty value of config and protocol shows as text, never as markup
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in text
    assert NASTY in "".join(page.text)


def test_report_eval_tables(tmp_path: Path) -> None:
    run = make_run(tmp_path, models=("spo", "ddpo"))
    text = write_report(run).read_text()
    parse(text)
    evaluation = text[text.index('<section id="evaluation">'):text.index('<section id="configuration">')]
    assert "5.912 [5.801, 6.023]" in evaluation and "5.983 [5.871, 6.094]" in evaluation
    assert '<span class="diff better">+0.0712 [+0.0123, +0.1301] \u25b2</span>' in evaluation
    assert '<span class="diff ns">-0.0212 [-0.0534, +0.0111]</span>' in evaluation
    assert '<span class="diff worse">+0.25 [+0.125, +0.375] \u25bc</span>' in evaluation  # lower is better
    assert "HPSv2: no weights given (--scorer hpsv2=PATH_OR_HUB_ID)" in evaluation
    assert "about 5 to 25 (toy: 0 to 10)" in evaluation
    assert "Model: base" in evaluation and "Model: spo" in evaluation and "Model: ddpo" in evaluation
    assert "spo \u2212 base" in evaluation and "ddpo \u2212 base" in evaluation  # side by side
    assert "per_image" in evaluation and "scores.csv" in evaluation and "12.3 s" in evaluation
    assert "prompts &lt;script&gt;" in evaluation


@pytest.mark.parametrize("method", ["spo", "ddpo", "diffusion_dpo", "spo+ddpo"])
def test_report_plots_per_method(tmp_path: Path, method: str) -> None:
    run = make_run(tmp_path, method, evaluation=False, samples=False)
    page = parse(write_report(run).read_text())
    assert sorted(s["attrs"].get("data-plot") for s in page.svgs) == sorted(EXPECTED_PLOTS[method])
    for s in page.svgs:
        assert any(_point_count(p) >= 2 for p in s["polylines"])


def test_report_summary_numbers(tmp_path: Path) -> None:
    run = make_run(tmp_path, evaluation=False, samples=False)
    text = write_report(run).read_text()
    summary = text[text.index('<section id="summary">'):text.index('<section id="training-curves">')]
    assert "<td>Method</td><td>spo</td>" in summary
    assert "<td>Rounds done</td><td>6 of 10</td>" in summary
    assert "<td>Optimiser steps</td><td>48</td>" in summary
    assert "28.5 s (sampling 19.5 s, training 9.0 s)" in summary  # 6 rounds x (3.25 + 1.5) s
    assert "round-000005" in summary and "Unreadable metrics lines</td><td>1<" in summary
    assert "<td>valid_pair_rate</td><td>0.5</td><td>0.55</td>" in summary


def test_report_empty_run(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    out = write_report(run)
    text = out.read_text()
    page = parse(text)
    assert set(SECTION_IDS) <= {a.get("id") for _, a in page.tags}
    assert "No metrics yet" in text and "No evaluation" in text and "No config.yaml" in text
    assert page.svgs == [] and not any(t == "img" for t, _ in page.tags)
    # a config and an empty metrics.jsonl: still no metrics
    (run / "config.yaml").write_text(_config_text("spo"))
    (run / "metrics.jsonl").write_text("")
    assert "No metrics yet" in write_report(run).read_text()


def test_report_preview_strip(tmp_path: Path) -> None:
    """The trainer's preview grids (spo.training.previews): the reference, then at most 8 rounds
    evenly spaced with the first and the last, in round order, each captioned, in one strip that
    scrolls sideways; other PNGs beside them stay the latest few."""
    run = make_run(tmp_path, evaluation=False, samples=False)
    _png(run / "samples" / "reference.png", (40, 60), (0, 0, 0))
    for r in range(5, 105, 5):  # 20 previews, written newest first: the order is the round's, not the file's time
        path = _png(run / "samples" / f"round-{r:06d}.png", (40, 60), (2 * r, 100, 100))
        os.utime(path, (2_000_000 - r, 2_000_000 - r))
    _png(run / "samples" / "other.png", (24, 24))
    text = write_report(run).read_text()
    page = parse(text)
    samples = text[text.index('<section id="samples">'):text.index('<section id="evaluation">')]
    strip = samples[samples.index('<div class="strip">'):samples.index("</div>")]
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", strip)
    assert captions == ["reference"] + [f"after {r} rounds" for r in (5, 20, 30, 45, 60, 75, 85, 100)]
    assert "8 of the 20 rounds with a preview, evenly spaced, the first and the last included" in samples
    assert 'style="width' not in samples.split('<div class="strip">')[1].split("</div>")[0]  # grids as drawn
    assert "logging.sample_every = 2" in samples and "Scroll sideways" in samples
    assert ".strip{display:flex;flex-wrap:nowrap;overflow-x:auto" in text
    assert "samples/other.png" in samples.split('<div class="strip">')[1].split("</div>", 1)[1]  # after the strip
    assert sum(1 for t, _ in page.tags if t == "img") == 10
    # a few rounds: every one of them, in round order
    for path in (run / "samples").glob("round-*.png"):
        if path.name not in ("round-000005.png", "round-000010.png"):
            path.unlink()
    _png(run / "samples" / "round-000001.png", (40, 60))
    samples = write_report(run).read_text().split('<section id="samples">')[1].split("</section>")[0]
    assert re.findall(r"<figcaption>([^<]*)</figcaption>", samples)[:4] == ["reference", "after 1 round",
                                                                              "after 5 rounds", "after 10 rounds"]
    assert "every round with a preview (3)" in samples


def test_report_eval_dirs_and_output(tmp_path: Path) -> None:
    run = make_run(tmp_path, evaluation=False, samples=False)
    outside = tmp_path / "elsewhere" / "eval-b"
    outside.mkdir(parents=True)
    (outside / "eval.json").write_text(json.dumps(eval_json(("spo",))))
    old = tmp_path / "old-eval"
    old.mkdir()
    (old / "eval.json").write_text(json.dumps({"prompts": ["a"], "base": {}}))
    out = write_report(run, eval_dirs=[outside, old, outside], output=tmp_path / "out" / "page.html")
    text = out.read_text()
    parse(text)
    assert text.count('<article class="eval"') == 2
    assert "not in the spo-eval/1 format" in text and "missing image" in text  # its grids were not written
    with pytest.raises(FileNotFoundError, match="no eval.json"):
        write_report(run, eval_dirs=[tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        write_report(tmp_path / "nope")


def test_report_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path, evaluation=False, samples=False)
    before = set(os.listdir(run))
    out = write_report(run)
    assert set(os.listdir(run)) == before | {"report.html"}  # no temporary file left
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    good = out.read_text()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(run)
    assert out.read_text() == good and set(os.listdir(run)) == before | {"report.html"}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------- svg tests
@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (0, 97, [0, 20, 40, 60, 80]),
    (1, 6000, [1000, 2000, 3000, 4000, 5000, 6000]),
    (-0.03, 0.07, [-0.02, 0, 0.02, 0.04, 0.06]),
    (0.25, 1.75, [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]),
    (5, 5, [5]),
])
def test_nice_ticks(lo: float, hi: float, expected: list[float]) -> None:
    assert svg.nice_ticks(lo, hi) == pytest.approx(expected)


def test_format_ticks() -> None:
    assert svg.format_ticks([0.0, 20.0, 40.0]) == ["0", "20", "40"]
    assert svg.format_ticks([0.0, 0.2, 0.4]) == ["0.0", "0.2", "0.4"]
    assert svg.format_ticks([-0.02, 0.0, 0.02]) == ["-0.02", "0.00", "0.02"]
    assert svg.format_ticks([0.25, 0.5]) == ["0.25", "0.50"]
    assert svg.format_ticks([2.8e-4, 3e-4, 3.2e-4]) == ["2.8e-4", "3.0e-4", "3.2e-4"]
    assert svg.format_ticks([0.0, 1e6, 2e6]) == ["0", "1e6", "2e6"]
    assert svg.format_ticks([]) == []


def test_line_plot_gaps_and_values() -> None:
    xs = [1, 2, 3, 4, 5, 6, 7]
    ys = [1.0, 2.0, float("nan"), 3.0, 4.0, None, 5.0]
    out = svg.line_plot({"a": (xs, ys)}, "gaps", "x", "y", markers=False)
    parse(out)
    polylines = re.findall(r'<polyline[^>]*points="([^"]*)"', out)
    assert [_point_count(p) for p in polylines] == [2, 2]  # NaN and None split the line
    assert out.count("<circle") == 1  # the lone last point
    assert "nan" not in out.lower().replace("font-family", "")


def test_line_plot_single_point_constant_and_empty() -> None:
    single = svg.line_plot({"one": ([3], [0.5])}, "single")
    parse(single)
    assert "<polyline" not in single and single.count("<circle") == 1
    const = svg.line_plot({"lr": (list(range(50)), [3e-4] * 50)}, "constant", smooth=5)
    parse(const)
    assert "3.0e-4" in const and "<polyline" in const
    coords = [float(v) for v in re.findall(r"-?\d+\.\d+", " ".join(re.findall(r'points="([^"]*)"', const)))]
    assert coords and all(math.isfinite(v) for v in coords)
    empty = svg.line_plot({"none": ([1, 2], [None, float("inf")])}, "empty")
    parse(empty)
    assert "no data" in empty and "<polyline" not in empty


def test_line_plot_smoothing_and_thinning() -> None:
    n = 5000
    ys = [math.sin(i / 50) + (3.0 if i == 1234 else 0.0) for i in range(n)]
    out = svg.line_plot({"loss": (list(range(n)), ys)}, "smooth", smooth=25)
    raw, smooth = re.findall(r'<polyline class="series"[^>]*points="([^"]*)"', out), \
        re.findall(r'<polyline class="series smoothed"[^>]*points="([^"]*)"', out)
    assert len(raw) == 1 and len(smooth) == 1
    assert 'stroke-opacity="0.28"' in out
    assert _point_count(raw[0]) <= svg.MAX_POINTS + 2
    thinned = svg.thin([(float(i), y) for i, y in enumerate(ys)], 100)
    assert (1234.0, ys[1234]) in thinned and len(thinned) <= 102
    assert svg.moving_average([1, None, 3, float("nan"), 5], 3) == [1.0, None, 3.0, None, 5.0]
    assert svg.moving_average([1, 2, 3, 4], 3) == [1.5, 2.0, 3.0, 3.5]


def test_svg_escaping() -> None:
    out = svg.line_plot({'a<b>&"c"': ([0, 1], [0, 1])}, "t <x> & 'y'", "x & y", "<y>")
    parse(out)
    assert "t &lt;x&gt; &amp; &#x27;y&#x27;" in out and "a&lt;b&gt;&amp;&quot;c&quot;" in out
    assert "x &amp; y" in out and "&lt;y&gt;" in out
    assert "<x>" not in out and "<b>" not in out and "http" not in out
    assert svg.escape("<&>\"'") == "&lt;&amp;&gt;&quot;&#x27;"


def test_per_timestep_plot() -> None:
    rows = {r: {751.0: r + 0.0, 501.0: r + 1.0, 1.0: r + 2.0} for r in range(20)}
    out = svg.per_timestep_plot(rows, "per t", max_lines=5)
    parse(out)
    assert [m for m in re.findall(r"round (\d+)<", out)] == ["0", "5", "10", "14", "19"]
    first = re.findall(r'<polyline[^>]*points="([^"]*)"', out)[0].split()
    x_751, x_1 = float(first[0].split(",")[0]), float(first[-1].split(",")[0])
    assert x_751 < x_1  # the noisiest timestep on the left
    assert svg.gradient_colour(0) == "#440154" and svg.gradient_colour(1) == "#fde725"
    assert svg.pick_evenly([3, 1, 2], 8) == [1, 2, 3] and svg.pick_evenly(list(range(10)), 1) == [9]
