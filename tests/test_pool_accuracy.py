"""Pool accuracy (spo.toy.pool_accuracy), the toy judges and DDIM continuations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spo.sampling import ddim_sample
from spo.toy.judges import JUDGES, AestheticOracleJudge, RandomJudge, judge_threshold, load_judge, tie_threshold
from spo.toy.pool_accuracy import (
    LABELS,
    PoolAccuracySettings,
    draw_pools,
    load_pools,
    measure,
    pool_metrics,
    pool_prompts,
    save_pools,
)


def test_pool_metrics_by_hand() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0],    # best 0, worst 3
                           [0.0, 5.0, 1.0, 2.0],    # best 1, worst 0
                           [1.0, 2.0, 3.0, 4.0]])   # best 3, worst 0
    labels = torch.tensor([[0.9, 0.5, 0.5, 0.1],    # right (0.9 > 0.1), ranks agree up to ties
                           [0.7, 0.2, 0.4, 0.6],    # wrong (0.2 < 0.7)
                           [0.3, 0.3, 0.3, 0.3]])   # labels all equal: undecided, no correlation
    m = pool_metrics(scores, labels, threshold=0.5)
    assert m["pools"] == 3 and m["decided_pools"] == 2
    assert m["agreement"][0] == pytest.approx(0.5)
    # softmax gaps: tanh(3/2) = 0.905, tanh(5/2) = 0.987, tanh(3/2): all valid at 0.5
    assert m["valid_rate"] == pytest.approx(1.0) and m["decided_valid_pools"] == 2
    # Spearman by hand: pool 0 ranks scores (4, 2, 3, 1) vs labels (4, 2.5, 2.5, 1) -> 0.9487;
    # pool 1: scores (1, 4, 2, 3) vs labels (4, 1, 2, 3) -> -0.4
    rho0 = np.corrcoef([4, 2, 3, 1], [4, 2.5, 2.5, 1])[0, 1]
    rho1 = np.corrcoef([1, 4, 2, 3], [4, 1, 2, 3])[0, 1]
    assert m["spearman"][0] == pytest.approx(round((rho0 + rho1) / 2, 4), abs=1e-4)
    assert m["label_gap"][0] == pytest.approx(round(((0.9 - 0.1) + (0.2 - 0.7) + 0) / 3, 4), abs=1e-4)
    # a high threshold leaves no valid pair: an empty share is NaN, not a number
    strict = pool_metrics(scores, labels, threshold=0.999)
    assert strict["valid_rate"] == 0 and math.isnan(strict["agreement_valid"][0]) and strict["decided_valid_pools"] == 0


def test_judges() -> None:
    from spo.toy import aesthetic, alignment, all_scenes, degrade, render
    from spo.toy.render import to_tensor_range

    rng = np.random.default_rng(0)
    scene = all_scenes()[0]
    clean = render(scene, rng)
    images = [clean, degrade(clean, "speckle", 0.5, rng), degrade(clean, "blur", 0.8, rng)]
    x = torch.from_numpy(np.stack([to_tensor_range(i) for i in images]))
    scores = AestheticOracleJudge()(x, [scene.prompt] * 3, torch.zeros(3))
    assert torch.allclose(scores.double(), torch.tensor([math.log(aesthetic(i)) for i in images], dtype=torch.float64),
                          atol=1e-5)
    a, b = RandomJudge(3)(x, [""] * 3), RandomJudge(3)(x, [""] * 3)
    assert torch.equal(a, b) and not torch.equal(a, RandomJudge(4)(x, [""] * 3))
    assert set(LABELS) == {"aesthetic", "alignment", "blend"}
    assert {"ideal-aesthetic", "random", "spm-v1", "pickscore-v1", "clip-v1"} <= set(JUDGES)
    with pytest.raises(ValueError, match="unknown judge"):
        load_judge("spm-v9")
    # the release's tie rule carried across logit scales: 0.3 at 100, 0.067 at the v1 SPM's 21.7
    assert tie_threshold(100.0) == pytest.approx(0.3, abs=1e-3)
    assert tie_threshold(21.7) == pytest.approx(0.067, abs=1e-3)
    from spo.toy.judges import judge_reference

    assert judge_reference("spm-v1") == ("toy:spm-v1", "step_aware")
    assert judge_reference("ideal-aesthetic")[1] == "control"
    from spo.builtin import resolve_weights

    assert judge_reference(resolve_weights("toy:pickscore-v1"))[1] == "clean"
    assert judge_reference(resolve_weights("toy:spm-v1"))[1] == "step_aware"
    from spo.toy.judges import judge_spec

    assert judge_spec("spm-v1") == ("spm-v1", "spm-v1")
    assert judge_spec(f"mine={resolve_weights('toy:spm-v1')}") == ("mine", resolve_weights("toy:spm-v1"))
    with pytest.raises(ValueError, match="unknown judge 'x'"):
        judge_spec("label=x")
    blend = load_judge("ideal-blend")(x, [scene.prompt] * 3)
    expected = [math.log(0.7 * alignment(i, scene) + 0.3 * aesthetic(i)) for i in images]
    assert torch.allclose(blend.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    spm = load_judge("spm-v1")
    assert judge_threshold("spm-v1", spm) == 0.07
    pickscore = load_judge("pickscore-v1")
    assert judge_threshold("pickscore-v1", pickscore) == tie_threshold(float(pickscore.model.logit_scale.exp()))
    # the clean variant ignores t; the step-aware one does not
    t0, t9 = torch.zeros(3, dtype=torch.long), torch.full((3,), 900)
    assert torch.equal(pickscore(x, [scene.prompt] * 3, t0), pickscore(x, [scene.prompt] * 3, t9))
    assert not torch.equal(spm(x, [scene.prompt] * 3, t0), spm(x, [scene.prompt] * 3, t9))


def test_ddim_continuation_is_the_same_trajectory() -> None:
    """Finishing x_t from step i with the generator where the full run left it gives the full run."""
    from spo.builtin import resolve_weights
    from spo.toy.model import ToyBackbone

    backbone = ToyBackbone.from_pretrained(resolve_weights("toy:base"), device="cpu")
    prompts = ["a small red circle on a white background", "two large blue squares on a black background"]
    full = ddim_sample(backbone, prompts, num_inference_steps=6, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    cond = backbone.encode_prompts(prompts)
    schedule = backbone.schedule(6)
    x = backbone.initial_latents(2, generator)
    for t in schedule.timesteps.tolist()[:2]:
        out = backbone.predict(x, t, cond, 3.0)
        x = schedule.step(out, t, x, eta=1.0, noise=torch.randn(x.shape, generator=generator)).prev_sample
    rest = ddim_sample(backbone, cond, num_inference_steps=6, guidance_scale=3.0, latents=x, generator=generator,
                       start_step=2)
    assert torch.equal(rest, full)
    with pytest.raises(ValueError, match="start_step"):
        ddim_sample(backbone, prompts, start_step=2)


def test_draw_pools_in_miniature(tmp_path) -> None:  # noqa: ANN001
    from spo.builtin import resolve_weights
    from spo.toy.model import ToyBackbone

    backbone = ToyBackbone.from_pretrained(resolve_weights("toy:base"), device="cpu")
    settings = PoolAccuracySettings(prompts=2, timesteps=[451, 51], k=3, continuations=2, num_inference_steps=20)
    pools = draw_pools(backbone, settings, progress=False)
    assert [p.t for p in pools] == [451, 51] and [p.score_t for p in pools] == [401, 1]
    for pool in pools:
        assert pool.images.shape == (2, 3, 3, 32, 32) and pool.images.abs().max() <= 1
        for name in LABELS:
            assert pool.labels[name].shape == (2, 3) and ((pool.labels[name] >= 0) & (pool.labels[name] <= 1)).all()
        blend = 0.7 * pool.labels["alignment"] + 0.3 * pool.labels["aesthetic"]
        assert torch.allclose(pool.labels["blend"], blend.to(pool.labels["blend"].dtype), atol=1e-6)
    # one step before the end the candidates' continuations differ only by that step's noise
    assert pools[1].continuations == 2
    with pytest.raises(ValueError, match="not on the"):
        draw_pools(backbone, PoolAccuracySettings(prompts=1, timesteps=[450]), progress=False)
    # the cache round trip, and a cache of other settings is not used
    save_pools(pools, settings, tmp_path / "pools.pt")
    again = load_pools(tmp_path / "pools.pt", settings)
    assert again is not None and torch.equal(again[0].images, pools[0].images)
    assert load_pools(tmp_path / "pools.pt", PoolAccuracySettings(prompts=3)) is None
    # the ideal aesthetic judge knows the aesthetic of the last step's candidates: its x0-hat is
    # one step from the finished image
    judges = {"ideal-aesthetic": (AestheticOracleJudge(), 0.07), "random": (RandomJudge(0), 0.07)}
    result = measure(judges, pools, pool_prompts(settings))
    entry = result["per_t"][1]["judges"]["ideal-aesthetic"]["aesthetic"]
    assert entry["pools"] == 2 and -1 <= entry["spearman"][0] <= 1
    # the trained pairs pool the per-t valid pairs: counts add up, the share is their weighted mean
    for name in judges:
        for label in ("aesthetic", "blend"):
            per_t = [e["judges"][name][label] for e in result["per_t"]]
            pooled = result["trained_pairs"][name][label]
            assert pooled["decided_valid_pools"] == sum(m["decided_valid_pools"] for m in per_t)
            if pooled["decided_valid_pools"]:
                weighted = sum(m["agreement_valid"][0] * m["decided_valid_pools"] for m in per_t if m["decided_valid_pools"])
                assert pooled["agreement_valid"][0] == pytest.approx(weighted / pooled["decided_valid_pools"], abs=1e-3)
    assert result["trained_pairs"]["random"]["valid_rate"] == pytest.approx(
        sum(e["judges"]["random"]["aesthetic"]["valid_rate"] for e in result["per_t"]) / len(result["per_t"]), abs=1e-3)
    assert pool_prompts(settings) == pool_prompts(settings) and len(set(pool_prompts(PoolAccuracySettings(prompts=50)))) == 50



def test_pool_accuracy_benchmark_reduced(tmp_path) -> None:  # noqa: ANN001
    """The benchmark script end to end, in miniature (CI's reduced run)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parent.parent / "benchmarks"
    out = tmp_path / "result.json"
    cmd = [sys.executable, "toy_pool_accuracy.py", "--prompts", "2", "--continuations", "2", "--timesteps", "301", "51",
           "--judges", "random", "ideal-aesthetic", "spm-v1", "--cache", str(tmp_path / "pools.pt"), "--output", str(out)]
    done = subprocess.run(cmd, cwd=bench, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [e["t"] for e in result["per_t"]] == [301, 51] and result["seconds_drawing_pools"] is not None
    assert set(result["per_t"][0]["judges"]) == {"random", "ideal-aesthetic", "spm-v1"}
    assert result["thresholds"]["spm-v1"] == 0.07
    # a second run reuses the cached pools
    again = subprocess.run(cmd, cwd=bench, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(out.read_text())["seconds_drawing_pools"] is None
    bad = subprocess.run([*cmd[:-2], "--judges", "nobody"], cwd=bench, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown judge 'nobody'" in bad.stderr


@pytest.fixture(scope="module")
def toy_base():  # noqa: ANN201
    from spo.builtin import resolve_weights
    from spo.toy.model import ToyBackbone

    return ToyBackbone.from_pretrained(resolve_weights("toy:base"), device="cpu")


def test_blend_continuation_judge(toy_base) -> None:  # noqa: ANN001
    """It finishes each candidate with the bound model: a clean picture one step before the end beats
    its speckled copy; seeded by the candidates (deterministic), M = 4 is another estimate than M = 1;
    at the last step it is the blend judge itself."""
    from spo.toy import all_scenes, degrade, render
    from spo.toy.judges import BlendContinuationJudge, BlendOracleJudge
    from spo.toy.render import to_tensor_range

    one, four = load_judge("ideal-blend-continuation", seed=0), load_judge("ideal-blend-continuation-4", seed=0)
    assert isinstance(one, BlendContinuationJudge) and (one.continuations, four.continuations) == (1, 4)
    assert one.takes_latents and one.needs_backbone and JUDGES["ideal-blend-continuation-4"][1] == "control"
    with pytest.raises(RuntimeError, match="bind"):
        one(torch.zeros(1, 3, 32, 32), ["x"], torch.tensor([51]))
    for judge in (one, four):
        judge.bind_sampling(toy_base, num_inference_steps=20, guidance_scale=3.0, eta=1.0)
    rng = np.random.default_rng(0)
    scene = all_scenes()[0]
    clean = render(scene, rng)
    x = torch.from_numpy(np.stack([to_tensor_range(i) for i in (clean, degrade(clean, "speckle", 0.8, rng))]))
    prompts = [scene.prompt] * 2
    near_end = one(x, prompts, torch.tensor([51, 51]))  # the candidates are at t = 1: one step to go
    assert near_end[0] > near_end[1]
    assert torch.allclose(one(x, prompts, torch.tensor([1, 1])), BlendOracleJudge()(x, prompts))  # x_0 already
    noisy = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = one(noisy, prompts, torch.full((2,), 151)), one(noisy, prompts, torch.full((2,), 151))
    assert torch.equal(a, b) and not torch.equal(a, four(noisy, prompts, torch.full((2,), 151)))


def test_pool_accuracy_latent_judges(toy_base, tmp_path) -> None:  # noqa: ANN001
    """The pools keep their candidates; a latent judge (an LRM built from toy:base, the continuation
    control) scores them at the branching t, with LPO's tie schedule; an old cache is refused."""
    from spo.builtin import resolve_weights
    from spo.preference.latent import LatentRewardModel
    from spo.toy.judges import BlendOracleJudge, lpo_thresholds
    from spo.toy.pool_accuracy import StalePoolsError, judge_pools

    settings = PoolAccuracySettings(prompts=2, timesteps=[151], continuations=1)
    pools = draw_pools(toy_base, settings, progress=False)
    assert pools[0].candidates.shape == (2, 4, 3, 32, 32) and pools[0].t == 151
    lrm = LatentRewardModel.from_pretrained(resolve_weights("toy:base"))
    continuation = load_judge("ideal-blend-continuation")
    continuation.bind_sampling(toy_base, num_inference_steps=20, guidance_scale=3.0, eta=1.0)
    prompts = pool_prompts(settings)
    expected = lrm(pools[0].candidates.flatten(0, 1), [q for q in prompts for _ in range(4)], torch.full((8,), 151))
    assert torch.allclose(judge_pools(lrm, pools[0], prompts), expected.view(2, 4))
    schedule = lpo_thresholds()
    assert schedule[951] == pytest.approx(0.5) and schedule[1] == pytest.approx(0.35) and 0.35 < schedule[151] < 0.5
    result = measure({"lrm": (lrm, schedule), "continuation": (continuation, 0.07), "blend": (BlendOracleJudge(), 0.07)},
                     pools, prompts)
    for name in ("lrm", "continuation", "blend"):
        assert result["per_t"][0]["judges"][name]["blend"]["pools"] == 2 and result["seconds_judging"][name] >= 0
    # a cache written before the pools kept their candidates is refused, naming the way out
    save_pools(pools, settings, tmp_path / "pools.pt")
    saved = torch.load(tmp_path / "pools.pt", weights_only=True)
    for pool in saved["pools"]:
        del pool["candidates"]
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(StalePoolsError, match="delete it to redraw"):
        load_pools(tmp_path / "old.pt", settings)
    assert load_pools(tmp_path / "old.pt", PoolAccuracySettings(prompts=3)) is None  # other settings: just not used
