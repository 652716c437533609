"""Candidate-pool rollouts (SPO and MSPO) on the tiny pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spo.backbones import SD15Backbone, SDXLBackbone
from spo.diffusion import predict_x0_and_epsilon
from spo.sampling import PoolSampler, branch_steps, divert_index

PROMPTS = ["a red circle", "a blue square", "two green stars"]
BACKBONES = {"sd15": SD15Backbone, "sdxl": SDXLBackbone}
TIMESTEPS_10 = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


class SpyScorer:
    """Brightness with a tiny per-candidate offset (no ties), remembering every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, list[str], torch.Tensor]] = []

    @staticmethod
    def scores(images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) * 100 + torch.arange(images.shape[0]) * 1e-3

    def __call__(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append((images.clone(), list(prompts), timesteps.clone()))
        return self.scores(images)


def _sampler(kind: str, path: Path, **kwargs: object) -> tuple[PoolSampler, SpyScorer, list[int]]:
    backbone = BACKBONES[kind].from_pretrained(str(path), device="cpu")
    scorer = SpyScorer()
    calls: list[int] = []
    backbone.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    options = dict(num_inference_steps=10, k=4, threshold=0.0, divert_start_step=4)
    options.update(kwargs)
    return PoolSampler(backbone, scorer, **options), scorer, calls  # type: ignore[arg-type]


def test_schedule_helpers() -> None:
    assert divert_index(TIMESTEPS_10, 4, None) == 4
    assert divert_index(TIMESTEPS_10, 4, 450) == 5  # first t <= kappa is 401
    assert divert_index(TIMESTEPS_10, 4, 0) == 10  # no pool at all
    assert branch_steps(10, 4, 1) == [4, 5, 6, 7, 8, 9]
    assert branch_steps(20, 4, 4) == [4, 8, 12, 16]  # the SDXL release: steps 4, 8, 12, 16 of 20


def test_spo_records_timesteps_and_passes(tiny_path: tuple[str, Path]) -> None:
    kind, path = tiny_path
    sampler, scorer, calls = _sampler(kind, path)
    rollout = sampler.rollout(PROMPTS, torch.Generator().manual_seed(0))
    rec, b, k = rollout.records, len(PROMPTS), 4
    pools = TIMESTEPS_10[4:]
    assert len(rec) == len(pools) * b  # every pool valid at threshold 0
    assert sorted(rec.timesteps.tolist(), reverse=True) == [t for t in pools for _ in range(b)]
    assert rec.x_t_win.shape == (len(rec), 4, 16, 16) and rec.x_prev_lose.shape == rec.x_t_win.shape
    assert bool(rec.shared_x_t.all())  # win and lose come from the same x_t
    assert bool((rec.x_prev_win != rec.x_prev_lose).flatten(1).any(1).all())
    assert bool((rec.score_win > rec.score_lose).all())
    assert len(rec.cond) == len(rec) and rec.cond.negative_prompt_embeds is not None
    # scored at the NEXT timestep (t = 0 for the final candidates), k images per prompt
    assert [int(c[2][0]) for c in scorer.calls] == [401, 301, 201, 101, 1, 0]
    assert all(c[0].shape[0] == b * k for c in scorer.calls)
    # no extra UNet pass: one call per denoising step (CFG rows batched), pools in one call
    assert calls == [2 * b] * 5 + [2 * b * k] * 5
    assert rollout.stats.valid_pair_rate == 1.0 and rollout.stats.pools == len(pools) * b
    assert set(rollout.stats.score_mean) == set(pools)


def test_scores_come_from_the_next_pass_x0_prediction(tiny_sd15_path: Path) -> None:
    sampler, scorer, _ = _sampler("sd15", tiny_sd15_path, resampler="win")
    rec = sampler.rollout(PROMPTS[:1], torch.Generator().manual_seed(1)).records
    bb, schedule = sampler.backbone, sampler.schedule()
    cond = bb.encode_prompts(PROMPTS[:1])
    for i, t_next in enumerate([401, 301, 201, 101, 1]):
        win_state = rec.x_prev_win[i : i + 1]
        out = bb.predict(win_state, t_next, cond, 5.0)  # an independent recomputation
        x0, _ = predict_x0_and_epsilon(out, win_state, schedule.alpha_bar(t_next), "epsilon")
        images, _, ts = scorer.calls[i]
        assert int(ts[0]) == t_next
        win_index = int(scorer.scores(images).argmax())  # the win candidate, from the scores
        torch.testing.assert_close(images[win_index : win_index + 1], bb.decode(x0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scorer.calls[-1][0].shape, torch.Size([4, 3, 32, 32]))


@pytest.mark.parametrize("resampler", ["win", "lose"])
def test_continuation_follows_the_resampler(tiny_sd15_path: Path, resampler: str) -> None:
    sampler, _, _ = _sampler("sd15", tiny_sd15_path, resampler=resampler)
    rec = sampler.rollout(PROMPTS[:2], torch.Generator().manual_seed(2)).records
    chosen = rec.x_prev_win if resampler == "win" else rec.x_prev_lose
    for p in range(2):
        rows = (rec.prompt_index == p).nonzero()[:, 0]
        for a, b in zip(rows[:-1], rows[1:]):
            torch.testing.assert_close(rec.x_t_win[b], chosen[a])


def test_random_continuation_picks_a_candidate(tiny_sd15_path: Path) -> None:
    """With the default resampler the next x_t is one of the k candidates: check via the
    candidate set the scorer decoded at the final step."""
    sampler, scorer, _ = _sampler("sd15", tiny_sd15_path, k=3)
    rollout = sampler.rollout(PROMPTS[:1], torch.Generator().manual_seed(3))
    final_images = scorer.calls[-1][0]
    decoded = sampler.backbone.decode(rollout.final_latents)
    assert float(min((final_images[j] - decoded[0]).abs().max() for j in range(3))) < 1e-5


def test_mspo_records(tiny_path: tuple[str, Path]) -> None:
    kind, path = tiny_path
    sampler, scorer, calls = _sampler(kind, path, inner_steps=3)
    rec = sampler.rollout(PROMPTS, torch.Generator().manual_seed(4)).records
    b, k = len(PROMPTS), 4
    # branching at steps 4 and 7; each branch runs 3 transitions; all are records
    assert len(rec) == 2 * 3 * b
    assert sorted(set(rec.timesteps.tolist()), reverse=True) == TIMESTEPS_10[4:]
    assert int(rec.shared_x_t.sum()) == 2 * b  # only the branching transition shares x_t
    assert [int(c[2][0]) for c in scorer.calls] == [201, 0]
    assert len(calls) == 10  # still one UNet call per denoising step
    # within a branch, each transition starts where the previous one ended, win and lose alike
    for p in range(b):
        rows = (rec.prompt_index == p).nonzero()[:, 0].tolist()
        for a, c in [(rows[0], rows[1]), (rows[1], rows[2]), (rows[3], rows[4]), (rows[4], rows[5])]:
            torch.testing.assert_close(rec.x_t_win[c], rec.x_prev_win[a])
            torch.testing.assert_close(rec.x_t_lose[c], rec.x_prev_lose[a])
        assert bool((rec.score_win[rows[0]] == rec.score_win[rows[2]]))  # one label per branch pair


def test_kappa_ties_and_determinism(tiny_sd15_path: Path) -> None:
    sampler, _, _ = _sampler("sd15", tiny_sd15_path, kappa=450)
    rollout = sampler.rollout(PROMPTS, torch.Generator().manual_seed(5))
    assert max(rollout.records.timesteps.tolist()) == 401
    again = sampler.rollout(PROMPTS, torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.records.x_prev_win, rollout.records.x_prev_win, rtol=0, atol=0)
    # a threshold no gap can pass: every pool is a tie, no records, no crash
    sampler.threshold = 0.999999
    tied = sampler.rollout(PROMPTS, torch.Generator().manual_seed(5))
    assert len(tied.records) == 0 and tied.stats.valid_pair_rate == 0.0 and tied.stats.pools == 5 * len(PROMPTS)


def test_decoding_in_chunks_changes_nothing_but_the_batch(tiny_path: tuple[str, Path]) -> None:
    """sampling.decode_batch_size bounds how many x0-hats are decoded at once (scoring stays one
    call per step); the records are the same as decoding a step's candidates in one batch (up to
    batched float sums)."""
    kind, path = tiny_path
    whole, whole_scorer, _ = _sampler(kind, path, decode_batch_size=None)
    chunked, chunked_scorer, _ = _sampler(kind, path, decode_batch_size=5)
    for sampler, spy in ((whole, whole_scorer), (chunked, chunked_scorer)):
        # brightness alone: SpyScorer's tie-breaking offset depends on the position in a batch
        sampler.scorer = lambda im, p, t, spy=spy: spy(im, p, t) - torch.arange(im.shape[0]) * 1e-3
    a = whole.rollout(PROMPTS, torch.Generator().manual_seed(3)).records
    b = chunked.rollout(PROMPTS, torch.Generator().manual_seed(3)).records
    decoded: list[int] = []
    real = chunked.backbone.decode_for_scoring
    chunked.backbone.decode_for_scoring = lambda x: decoded.append(x.shape[0]) or real(x)  # type: ignore[method-assign]
    assert len(a) == len(b)
    for name in ("x_t_win", "x_prev_win", "x_prev_lose", "timesteps", "score_win", "score_lose"):
        assert torch.allclose(getattr(a, name).float(), getattr(b, name).float(), atol=1e-4), name


def test_the_config_default_chunks_decodes_by_eight(tiny_sd15_path: Path) -> None:
    from spo.config import load_config

    config = load_config("sd15", [f"model.pretrained={tiny_sd15_path}", "model.device=cpu"])
    backbone = SD15Backbone.from_pretrained(str(tiny_sd15_path), device="cpu")
    assert PoolSampler.from_config(backbone, SpyScorer(), config).decode_batch_size == 8
    config = load_config("sd15", [f"model.pretrained={tiny_sd15_path}", "sampling.decode_batch_size=null"])
    assert PoolSampler.from_config(backbone, SpyScorer(), config).decode_batch_size is None


def test_non_finite_scores_make_a_counted_tie_never_a_pair(tiny_sd15_path: Path) -> None:
    """A preference model that overflows (NaN / inf scores) turns that pool into a tie: no record
    carries a non-finite score, the pools are counted, the score statistics stay finite."""
    sampler, spy, _ = _sampler("sd15", tiny_sd15_path)

    def overflowing(images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        scores = spy(images, prompts, timesteps)
        scores[0] = float("nan")  # the first candidate of the first prompt's pool
        scores[-1] = float("inf")  # the last candidate of the last prompt's pool
        return scores

    sampler.scorer = overflowing
    rollout = sampler.rollout(PROMPTS, torch.Generator().manual_seed(0))
    pools = len(TIMESTEPS_10[4:])
    assert rollout.stats.nonfinite_pools == 2 * pools
    assert rollout.stats.valid_pairs == (len(PROMPTS) - 2) * pools  # threshold 0: every other pool pairs
    rec = rollout.records
    assert torch.isfinite(rec.score_win).all() and torch.isfinite(rec.score_lose).all()
    assert set(rec.prompt_index.tolist()) == {1}
    assert all(torch.isfinite(torch.tensor(v)) for v in rollout.stats.score_mean.values())


def test_kappa_750_is_one_pool_fewer_than_the_releases_divert_step() -> None:
    """The release's divert_start_step=4 pools the 16 steps t = 751 ... 1 of SD-1.5's 20-step
    schedule; the paper's kappa = 750 starts at t = 701 (15 pools); kappa = 751 is the release's."""
    timesteps = list(range(951, 0, -50))
    assert len(timesteps) == 20
    assert timesteps[divert_index(timesteps, 4, None)] == 751 and len(timesteps) - divert_index(timesteps, 4, None) == 16
    assert timesteps[divert_index(timesteps, 4, 750)] == 701 and len(timesteps) - divert_index(timesteps, 4, 750) == 15
    assert divert_index(timesteps, 4, 751) == 4


@pytest.mark.parametrize("latents", [False, True])
def test_the_preference_model_scores_outside_the_trainers_autocast(tiny_sd15_path: Path, latents: bool) -> None:
    """The trainer samples under mixed precision (acc.autocast); the scorer runs with autocast off,
    in its own dtype (an fp32 SPM in fp32, as the release's: with LoRA it uses no autocast; LPO's
    latent reward model likewise), while the policy's passes keep it."""
    sampler, scorer, _ = _sampler("sd15", tiny_sd15_path)
    seen: dict[str, list[bool]] = {"scorer": [], "unet": []}
    plain = scorer.__call__

    class Spied:
        takes_latents = latents

        def __call__(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
            seen["scorer"].append(torch.is_autocast_enabled("cpu"))
            return plain(images, prompts, timesteps)

    sampler.scorer = Spied()
    sampler.scores_latents = latents
    sampler.backbone.unet.register_forward_hook(lambda m, a, o: seen["unet"].append(torch.is_autocast_enabled("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sampler.rollout(PROMPTS[:2], torch.Generator().manual_seed(0))
    assert seen["scorer"] and not any(seen["scorer"])
    assert seen["unet"] and all(seen["unet"])
