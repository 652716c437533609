"""Parity with the LPO authors' release, run against its own code (tests/lpo_oracle.py).

On identical inputs, what the release computes and what we compute agree:

a. the latent reward model: the release's ``SD15PreferenceModel`` / ``SDXLBasePreferenceModel``
   (``lpo/lpo/preference_models/models/``) and our ``LatentRewardModel`` with its weights (its
   state dict copied into ours, key for key), ``get_preference_score`` against ours, with and
   without multi-scale, guidance 7.5 and 1.0, ``multi_scale_cfg`` false and true; and what its
   ``save`` writes (and a whole-model state dict file) loads as ``preference.checkpoint``;
b. the tie thresholds: ``compare_funcs.dynamic_threshold_sigma`` / ``_variance`` / ``_linear`` at
   SD's 20 DDIM timesteps against ``tie_thresholds``, and ``preference_score_compare``'s pairs and
   ties against ``choose_pairs`` with the per-timestep threshold;
c. whole LPO rollouts: the release's ``multi_sample_pipeline`` (SD-1.5) and
   ``multi_sample_pipeline_sdxl`` (scoring the k candidates x_{t-1} at t, nothing decoded) against
   our ``PoolSampler`` with a latent scorer (``takes_latents``), from one pre-drawn noise bank and
   the same continuation choices (the technique of tests/test_release_parity.py), with the
   release's compare function (``dynamic_threshold='sigma'``, 0.35 to 0.5): the same scores, pairs,
   ties and win/lose records; with a stub latent scorer, and with the latent reward models
   themselves (the release's ``preference_fn`` and ours).

The release's multi-scale models are built on tiny pipelines whose UNets have the real block
layout (tests/lpo_oracle.py: ``multiscale_unet``), since the release indexes the down blocks'
outputs by hard-coded positions; its hard-coded projection widths (4800, 3520: the real models')
are replaced by the tiny models' (tests/test_latent_reward.py checks ours give 4800 and 3520 on
the real configs).

``SPO_PARITY_REPORT=parity.json`` records the largest differences, as tests/test_release_parity.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpo_oracle import lpo_module, one_thread, release_line, require_release
from spo.backbones import SD15Backbone, SDXLBackbone
from spo.diffusion import DDIMSchedule
from spo.preference.latent import LatentRewardModel, unet_features
from spo.sampling.pairs import choose_pairs, tie_thresholds
from test_release_parity import PROMPTS, Banks, _compare_pools, _compare_records, _our_rollout, _their_records
from test_release_parity import max_diff, record_difference

LATENTS_SEED = 4
TIMESTEPS = torch.tensor([951, 951, 501, 251, 51, 1])
SCORE_PROMPTS = PROMPTS + PROMPTS[::-1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release's ``clip_ckpt_path``: a torch file holding CLIP's ``text_projection.weight``
    (CLIP ViT-L/14's 768 x 768 in the release; the tiny text encoder's 32 x 32 here)."""
    path = tmp_path_factory.mktemp("clip") / "pytorch_model.bin"
    torch.save({"text_projection.weight": torch.randn(32, 32, generator=torch.Generator().manual_seed(9)) * 0.2}, path)
    return path


# ------------------------------------------------------------------------------ a. the models
def _release_model(kind: str, path: Path, clip_ckpt: Path, multi_scale: bool = True, guidance_scale: float = 7.5,
                   multi_scale_cfg: bool = False, seed: int = 2) -> Any:
    """The release's preference model of ``kind`` on the tiny pipeline at ``path``, its visual
    projection at the tiny UNet's width, its UNet moved off the base (as training would), and a
    logit scale of its own."""
    import accelerate

    accelerate.PartialState()  # the release logs through accelerate's logger, which needs a state
    common = dict(pretrained_model_name_or_path=str(path), ft_model_path=None, vision_embed_dim=48,
                  text_embed_dim=32, projection_dim=32, multi_scale=multi_scale, multi_scale_cfg=multi_scale_cfg,
                  guidance_scale=guidance_scale)
    if kind == "sd15":
        models = lpo_module("preference_models.models.sd15_preference_model")
        model = models.SD15PreferenceModel(models.SD15PreferenceModelConfig(clip_ckpt_path=str(clip_ckpt), **common))
    else:
        models = lpo_module("preference_models.models.sdxl_base_preference_model")
        model = models.SDXLBasePreferenceModel(models.SDXLBasePreferenceModelConfig(
            pretrained_vae_name_or_path=str(path / "vae"), **common))
    gen = torch.Generator().manual_seed(seed)
    if multi_scale:  # the release's Linear(4800 / 3520, ...) is the real models' width
        width = sum(model.unet.config.block_out_channels) + model.unet.config.block_out_channels[-1]
        model.visual_projection = nn.Linear(width, 32, bias=False)
    with torch.no_grad():
        model.visual_projection.weight.copy_(torch.randn(model.visual_projection.weight.shape, generator=gen) * 0.02)
        model.logit_scale.fill_(3.0)
        model.unet.conv_in.weight.add_(torch.randn(model.unet.conv_in.weight.shape, generator=gen) * 0.02)
    return model.eval().requires_grad_(False)


def _release_scores(kind: str, model: Any, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
    ids = model.encode_prompt(prompts)
    if kind == "sd15":
        return model.get_preference_score(latents, ids, timesteps)
    return model.get_preference_score(latents, ids[0], ids[1], timesteps)


def _ours_from(release: Any, path: Path, **settings: Any) -> LatentRewardModel:
    """Our LRM on the same base, the release model's state dict copied into it key for key (all
    but its VAE's, which ours does not hold: scoring never decodes)."""
    ours = LatentRewardModel.from_pretrained(str(path), **settings)
    state = {k: v for k, v in release.state_dict().items() if not k.startswith("vae.")}
    ours.load_state_dict(state, strict=True)
    return ours


def _latents(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(LATENTS_SEED)) * 1.5


@pytest.mark.parametrize("multi_scale,multi_scale_cfg,guidance_scale", [
    (True, False, 7.5),  # the release's configs (multiscale, wocfg, cfg75)
    (True, True, 7.5),
    (False, False, 7.5),
    (True, False, 1.0),
])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_latent_reward_model_matches_the_release(kind: str, multi_scale: bool, multi_scale_cfg: bool, guidance_scale: float,
                                                 request: pytest.FixtureRequest, clip_ckpt: Path) -> None:
    """``get_preference_score(noisy_latents, input_ids[, input_ids_2], timesteps)`` of the
    release's model and our LRM with its weights, six latents at six timesteps: equal to float
    rounding. The release's SDXL model with ``multi_scale_cfg`` does not guide its first stage
    (a known quirk, see below); there the first stage's columns of the projection are zeroed on
    both sides and the rest is compared."""
    path = request.getfixturevalue(f"lrm_{kind}_path")
    release = _release_model(kind, path, clip_ckpt, multi_scale, guidance_scale, multi_scale_cfg)
    quirk = kind == "sdxl" and multi_scale and multi_scale_cfg and guidance_scale > 1.0
    if quirk:
        first = release.unet.config.block_out_channels[0]
        ours = _ours_from(release, path, multi_scale=multi_scale, guidance_scale=guidance_scale, multi_scale_cfg=multi_scale_cfg)
        differs = max_diff(ours(_latents(), SCORE_PROMPTS, TIMESTEPS),
                           _release_scores(kind, release, _latents(), SCORE_PROMPTS, TIMESTEPS))
        where = release_line("preference_models/models/sdxl_base_preference_model.py",
                             "pooled_first_stage_output = pooled_first_stage_output_text")
        assert differs > 1e-4, f"the release's unguided first stage under multi_scale_cfg ({where}) no longer differs"
        with torch.no_grad():
            release.visual_projection.weight[:, :first] = 0
    ours = _ours_from(release, path, multi_scale=multi_scale, guidance_scale=guidance_scale, multi_scale_cfg=multi_scale_cfg)
    theirs = _release_scores(kind, release, _latents(), SCORE_PROMPTS, TIMESTEPS)
    mine = ours(_latents(), SCORE_PROMPTS, TIMESTEPS)
    assert theirs.shape == mine.shape == (6,) and theirs.dtype == mine.dtype == torch.float32
    diff = max_diff(mine, theirs)
    record_difference(f"LPO a. LRM scores ({kind})", diff)
    assert diff < 2e-5 * max(1.0, float(theirs.abs().max()))
    assert float(theirs.std()) > 1e-3  # the scores do tell the latents apart


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_latent_reward_model_in_fp16_is_the_releases_to_its_rounding(kind: str, request: pytest.FixtureRequest,
                                                                     clip_ckpt: Path) -> None:
    """In half precision, as the release scores (``preference_model_fns.py`` casts the model to
    fp16): its pooling, guidance, norms and logit scale run in fp16 and return fp16 scores; ours
    pools and normalises in fp32 (float32 scores). They agree to fp16's rounding of the scores."""
    path = request.getfixturevalue(f"lrm_{kind}_path")
    release = _release_model(kind, path, clip_ckpt)
    ours = _ours_from(release, path).to(dtype=torch.float16)
    release = release.to(torch.float16)
    theirs = _release_scores(kind, release, _latents(), SCORE_PROMPTS, TIMESTEPS)
    mine = ours(_latents(), SCORE_PROMPTS, TIMESTEPS)
    assert theirs.dtype == torch.float16 and mine.dtype == torch.float32
    diff = max_diff(mine, theirs)
    record_difference(f"LPO a. LRM scores in fp16 ({kind})", diff)
    assert diff < 2e-3 * max(1.0, float(theirs.abs().max()))  # fp16 spacing: 2^-10 of the magnitude


def test_the_release_and_ours_read_the_same_stages(lrm_sd15_path: Path) -> None:
    """The release's reward UNet (``use_up_blocks=False``) returns (mid, down_block_res_samples);
    at its indices 2, 5, 8, 11 they are our unet_features' stages, its mid our mid."""
    reward_unet = lpo_module("preference_models.models.unet_2d_condition_reward").UNet2DConditionModel
    unet = reward_unet.from_pretrained(str(lrm_sd15_path), subfolder="unet").eval()
    gen = torch.Generator().manual_seed(0)
    x, hidden, t = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen), torch.tensor([901, 1])
    with torch.no_grad():
        mid, res = unet(x, t, encoder_hidden_states=hidden, return_dict=False, use_up_blocks=False)
        stages, our_mid = unet_features(unet, x, t, hidden)
    for stage, index in zip(stages, [2, 5, 8, 11], strict=True):
        torch.testing.assert_close(stage, res[index], rtol=0, atol=0)
    torch.testing.assert_close(our_mid, mid, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_what_the_release_saves_loads_as_the_checkpoint(kind: str, request: pytest.FixtureRequest, clip_ckpt: Path,
                                                         tmp_path: Path) -> None:
    """The release's own ``save(path)`` (unet/, text_encoder/[, text_encoder_2/], state_dict.pt)
    and, for SDXL, whose ``load`` also takes a file, ``torch.save(model.state_dict())`` (its VAE's
    weights included): loaded by ours as ``preference.checkpoint`` over the base, the scores are
    the release model's."""
    path = request.getfixturevalue(f"lrm_{kind}_path")
    release = _release_model(kind, path, clip_ckpt, seed=7)
    with torch.no_grad():
        release.text_encoder.get_input_embeddings().weight.mul_(1.05)
    release.save(str(tmp_path / "release"))
    theirs = _release_scores(kind, release, _latents(), SCORE_PROMPTS, TIMESTEPS)
    ours = LatentRewardModel.from_pretrained(str(path), checkpoint=str(tmp_path / "release"))
    diff = max_diff(ours(_latents(), SCORE_PROMPTS, TIMESTEPS), theirs)
    if kind == "sdxl":
        torch.save(release.state_dict(), tmp_path / "whole.pt")
        assert any(k.startswith("vae.") for k in release.state_dict())
        whole = LatentRewardModel.from_pretrained(str(path), checkpoint=str(tmp_path / "whole.pt"))
        diff = max(diff, max_diff(whole(_latents(), SCORE_PROMPTS, TIMESTEPS), theirs))
    record_difference(f"LPO a. released checkpoint loaded ({kind})", diff)
    assert diff < 2e-5 * max(1.0, float(theirs.abs().max()))


# ------------------------------------------------------------------------------ b. the tie thresholds
def _sd_schedule() -> DDIMSchedule:
    """SD's 20-step DDIM schedule, as the release's scheduler: beta 0.00085 .. 0.012 scaled
    linear, steps_offset 1, set_alpha_to_one false."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
    return DDIMSchedule.from_config(scheduler.config, 20)


@pytest.mark.parametrize("kind", ["sigma", "variance", "linear"])
def test_dynamic_thresholds_match_the_release(kind: str) -> None:
    """``dynamic_threshold_<kind>(0.35, 0.5, timesteps)`` (tables of sigma_t and sigma_t^2 to four
    decimals, indexed by t // 50; linear in t from 1 to 951) against ``tie_thresholds`` computed
    from the schedule: equal to the tables' precision; the release's sigma table is our sigma_t
    rounded to four decimals, its variance table the square of that table, rounded again."""
    compare = lpo_module("preference_models.compare_funcs")
    schedule = _sd_schedule()
    timesteps = schedule.timesteps
    assert timesteps.tolist() == list(range(951, 0, -50))
    theirs = getattr(compare, f"dynamic_threshold_{kind}")(0.35, 0.5, timesteps)
    ours = tie_thresholds(schedule, timesteps.tolist(), kind, 0.3, 0.35, 0.5)
    mine = torch.tensor([ours[t] for t in timesteps.tolist()], dtype=torch.float64)
    diff = max_diff(mine, theirs)
    record_difference(f"LPO b. {kind} thresholds", diff)
    assert diff < (1e-6 if kind == "linear" else 5e-5)  # linear: float32 rounding of the release
    assert ours[951] == pytest.approx(0.5) and ours[1] == pytest.approx(0.35)
    if kind != "linear":
        zero = torch.zeros(1, dtype=torch.float64)
        sigma = torch.tensor([float(schedule.posterior(zero, t, zero, eta=1.0)[1].reshape(-1)[0]) for t in range(1, 1000, 50)],
                             dtype=torch.float64)
        rounded = (sigma * 1e4).round() / 1e4
        assert torch.equal(rounded, (compare.sigma_tensor.double() * 1e4).round() / 1e4)
        if kind == "variance":  # the release squared its rounded sigma table (0.2509^2 = 0.062950 -> 0.0630)
            assert torch.equal((rounded**2 * 1e4).round() / 1e4, (compare.variance_tensor.double() * 1e4).round() / 1e4)


@pytest.mark.parametrize("kind", ["sigma", "variance", "linear"])
def test_pairs_and_ties_match_the_release(kind: str) -> None:
    """``preference_score_compare(scores (k, B), threshold, timesteps, dynamic_threshold=kind,
    0.35, 0.5)`` and ``choose_pairs(scores (B, k), tie_thresholds[t])`` at every timestep of the
    schedule, 64 pools of k = 4 with gaps around the threshold: the same win, lose and validity
    (pools whose gap lies within 1e-4 of the threshold, where the release's 4-decimal table and
    the exact sigma_t might disagree, are left out: a handful at most of the 1280)."""
    compare = lpo_module("preference_models.compare_funcs")
    schedule = _sd_schedule()
    ts = schedule.timesteps.tolist()
    thresholds = tie_thresholds(schedule, ts, kind, 0.3, 0.35, 0.5)
    gen = torch.Generator().manual_seed(1)
    valid = ties = near = 0
    for t in ts:
        scores = torch.randn(64, 4, generator=gen) * 0.45
        indices, their_valid = compare.preference_score_compare(scores.T.clone(), threshold=0.3, timesteps=torch.full((64,), t),
                                                                dynamic_threshold=kind, threshold_min=0.35, threshold_max=0.5)
        choice = choose_pairs(scores, thresholds[t])
        assert torch.equal(choice.win, indices[0]) and torch.equal(choice.lose, indices[-1])
        close = (choice.gap - thresholds[t]).abs() < 1e-4
        near += int(close.sum())
        assert torch.equal(choice.valid[~close], their_valid[~close])
        valid, ties = valid + int(their_valid.sum()), ties + int((~their_valid).sum())
    assert near <= 5 and valid > 200 and ties > 200


# ------------------------------------------------------------------------------ c. the rollouts
class LatentStub:
    """A deterministic latent scorer: a fixed random projection of the 4x4-pooled latents, plus
    terms in the prompt and the timestep (so both must arrive right). ``takes_latents``: our pool
    sampler hands it the candidates' x_{t-1} at t, as the release's pipeline does."""

    takes_latents = True

    def __init__(self, scale: float) -> None:
        self.weights = torch.randn(64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        self.scale = scale
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def score(self, latents: torch.Tensor, prompt_ids: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        feats = F.adaptive_avg_pool2d(latents.double(), 4).flatten(1)
        self.calls.append((latents.detach().clone(), prompt_ids.clone(), timesteps.clone()))
        return (self.scale * (feats @ self.weights) + 0.05 * prompt_ids.double() + timesteps.double() / 1000).float()

    def release_fn(self, latents: torch.Tensor, extra_info: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.score(latents, extra_info["input_ids"], extra_info["timesteps"])

    def __call__(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        return self.score(latents, torch.tensor([PROMPTS.index(p) for p in prompts]), timesteps)


class LatentModelScorer:
    """Our LatentRewardModel as the pool sampler's scorer, seeing what it is handed."""

    takes_latents = True

    def __init__(self, model: LatentRewardModel) -> None:
        self.model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append((latents.clone(), torch.tensor([PROMPTS.index(p) for p in prompts]), timesteps.clone()))
        return self.model(latents, prompts, timesteps)


def _release_lpo_compare(seen: list[Any]) -> Callable[..., Any]:
    """The release's compare function as its LPO configs build it (``get_compare_func``:
    ``partial(preference_score_compare, threshold=0.3, dynamic_threshold='sigma', 0.35, 0.5)``)."""
    rule = lpo_module("preference_models.compare_funcs").preference_score_compare

    def compare(scores: torch.Tensor, timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        indices, valid = rule(scores, threshold=0.3, timesteps=timesteps, dynamic_threshold="sigma",
                              threshold_min=0.35, threshold_max=0.5)
        seen.append((scores.clone(), indices.clone(), valid.clone()))
        return indices, valid

    return compare


def _release_pipe(kind: str, path: Path) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sd15":
        pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(path))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as train_lpo.py / train_lpo_sdxl.py do
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_release(monkeypatch: pytest.MonkeyPatch, banks: Banks, call: Callable[[], Any]) -> Any:
    """Run the release's pipeline drawing its noise and continuation choices from ``banks``
    (its DDIM step's ``randn_tensor`` and ``torch.randint``, replaced while it runs)."""
    seperate = lpo_module("custom_diffusers.ddim_seperate")
    with monkeypatch.context() as m:
        m.setattr(seperate, "randn_tensor", banks.release_noise)
        m.setattr(torch, "randint", banks.release_randint)
        return call()


def _compare_calls(theirs: list[Any], ours: list[Any], k: int, batch: int) -> float:
    """What each scorer saw: the same latents, prompts and timesteps, theirs (k, B) candidate-major."""
    assert len(theirs) == len(ours) > 0
    order = torch.arange(batch * k).view(k, batch).T.reshape(-1)
    worst = 0.0
    for (lat_t, ids_t, ts_t), (lat_o, ids_o, ts_o) in zip(theirs, ours):
        worst = max(worst, max_diff(lat_o, lat_t[order]))
        assert torch.equal(ids_o, ids_t[order]) and ts_o.tolist() == ts_t[order].tolist()
    return worst


@pytest.mark.parametrize("kind,scorer", [("sd15", "stub"), ("sd15", "lrm"), ("sdxl", "stub")])
def test_lpo_rollout_matches_the_release(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, clip_ckpt: Path,
                                         kind: str, scorer: str) -> None:
    """One full LPO rollout of the release's pipeline and of our PoolSampler (k = 4, 20 steps,
    CFG 5, eta 1, pools at every step: ``divert_start_step`` 0 as the LPO configs, sigma
    thresholds 0.35 .. 0.5) from the same x_T, noise and continuation choices: the scorer sees
    the same candidates x_{t-1} at the same t with the same prompts; every pool's scores, pairs
    and ties, and every win/lose record (x_t, x_{t-1} win / lose, t, prompt embeddings) agree.
    ``stub``: a fixed function of the latents; ``lrm``: the release's latent reward model
    (``preference_fn``, input_ids repeated k times as train_lpo.py builds them) and ours with its
    weights (SD-1.5 only, to keep the file fast: the SDXL model's parity is a., its pipeline's
    plumbing the stub's). The SDXL release pipeline has no MSPO and pools the last step too (no
    folding)."""
    pipeline = (lpo_module("custom_diffusers.multi_sample_pipeline").multi_sample_pipeline if kind == "sd15" else
                lpo_module("custom_diffusers.multi_sample_pipeline_sdxl").multi_sample_pipeline_sdxl)
    pipe = _release_pipe(kind, request.getfixturevalue(f"tiny_{kind}_path"))
    k, batch = 4, len(PROMPTS)
    banks = Banks(k, batch)
    x_T = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    if scorer == "stub":
        theirs_scorer, ours_scorer = LatentStub(1.5), LatentStub(1.5)
        release_fn = theirs_scorer.release_fn
        extra_info: dict[str, Any] = {"input_ids": torch.arange(batch).repeat(k)}
        their_calls = theirs_scorer.calls
    else:
        path = request.getfixturevalue(f"lrm_{kind}_path")
        release = _release_model(kind, path, clip_ckpt, seed=3)
        with torch.no_grad():
            release.logit_scale.fill_(4.6052)  # CLIP's cap, log 100: gaps on both sides of the threshold
        ours_scorer = LatentModelScorer(_ours_from(release, path))
        ids = release.encode_prompt(PROMPTS)
        their_calls = []

        def release_fn(latents: torch.Tensor, info: dict[str, torch.Tensor]) -> torch.Tensor:
            their_calls.append((latents.clone(), info["prompt_index"].clone(), info["timesteps"].clone()))
            if kind == "sd15":
                return release.get_preference_score(latents, info["input_ids"], info["timesteps"])
            return release.get_preference_score(latents, info["input_ids"], info["input_ids_2"], info["timesteps"])

        extra_info = {"prompt_index": torch.arange(batch).repeat(k)}
        if kind == "sd15":
            extra_info["input_ids"] = ids.repeat(k, 1)
        else:
            extra_info.update(input_ids=ids[0].repeat(k, 1), input_ids_2=ids[1].repeat(k, 1))
    their_pools: list[Any] = []
    out = _run_release(monkeypatch, banks, lambda: pipeline(
        pipe, prompt=PROMPTS, num_inference_steps=20, guidance_scale=5.0, eta=1.0, latents=x_T.clone(),
        divert_start_step=0, num_samples_each_step=k, preference_model_fn=release_fn,
        compare_fn=_release_lpo_compare(their_pools), extra_info=extra_info,
    ))
    times, current, nxt, embeds = out[:4]
    backbone = (SD15Backbone if kind == "sd15" else SDXLBackbone).from_pretrained(
        str(request.getfixturevalue(f"tiny_{kind}_path")), device="cpu")
    rollout, our_pools = _our_rollout(monkeypatch, backbone, banks, x_T, ours_scorer, k=k, divert_start_step=0,
                                      threshold_schedule="sigma", threshold_min=0.35, threshold_max=0.5)
    assert len(their_pools) == 20 and rollout.stats.decoded == 0 and rollout.stats.scored == 20 * k * batch
    # one UNet pass per step on the continuing latents alone (B rows, x2 for CFG): none on the branches
    assert rollout.stats.unet_calls == 20 and rollout.stats.unet_rows == 20 * batch * 2
    latent_diff = _compare_calls(their_calls, ours_scorer.calls, k, batch)
    score_diff, valid, ties = _compare_pools(their_pools, our_pools, k)
    assert valid > 0 and ties > 0
    rec = rollout.records
    record_diff = _compare_records(_their_records(times, current, nxt), rec, embeds[:, 0], rec.cond.prompt_embeds)
    if kind == "sdxl":
        record_diff = max(record_diff, max_diff(rec.cond.pooled, out[4][:, 0]))
    assert bool(rec.shared_x_t.all())  # one step per pool: every record starts from the pool's shared x_t
    # the thresholds the pools were judged by: every gap clear of the release's table rounding
    thresholds = {t: float(compare) for t, compare in zip(
        range(951, 0, -50), lpo_module("preference_models.compare_funcs").dynamic_threshold_sigma(
            0.35, 0.5, torch.arange(951, 0, -50)))}
    for (_, choice), t in zip(our_pools, range(951, 0, -50)):
        assert float((choice.gap - thresholds[t]).abs().min()) > 1e-4
    record_difference(f"LPO c. {kind} rollout ({scorer}): latents scored", latent_diff)
    record_difference(f"LPO c. {kind} rollout ({scorer}): scores", score_diff)
    record_difference(f"LPO c. {kind} rollout ({scorer}): records", record_diff)
    assert latent_diff < 1e-4 and score_diff < 1e-3 and record_diff < 1e-4


def test_the_release_is_where_the_oracle_looks() -> None:
    """The oracle's own check (skips without the release, fails with SPO_REQUIRE_RELEASE=1)."""
    assert (require_release() / "lpo" / "lpo" / "preference_models" / "compare_funcs.py").is_file()
