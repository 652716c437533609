"""D3PO (Yang et al., 2024): DPO on every step of two trajectories from the same x_T.

Per prompt, two stochastic DDIM trajectories (eta = 1) start from ONE x_T and differ only by
their step noise; a reward model labels the pair on the final images (equal rewards: a tie,
dropped). Every step j of the pair is a win/lose transition pair trained with

    r = clamp(p_theta(x_{j-1} | x_j, c) / p_ref(x_{j-1} | x_j, c), 1 - eps, 1 + eps),
    loss_j = -log sigmoid(beta * (log r_w - log r_l)),

against the frozen reference (not the sampling policy), both with CFG as in sampling; beta 0.1,
eps 0.1 in D3PO's code. That is SPO's clamped-ratio loss (:func:`spo.objectives.spo.spo_loss`)
on other pairs: the rollout is a single candidate pool at x_T whose k = 2 branches each run to
the end before scoring (MSPO with kappa = T and j = all steps), on the same pool sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backbones import Backbone
from ..config import SPOConfig
from ..sampling import PoolSampler
from .spo import SPOMethod, SPOMethodConfig


@dataclass
class D3POConfig(SPOMethodConfig):
    """D3PO's settings (``objective.name: d3po``): SPO's loss settings (``beta`` 0.1 and ``eps`` 0.1
    in D3PO's code), and

    Attributes:
        samples_per_prompt: Trajectories from one x_T per prompt (D3PO's pair: 2; with more, the
            best and worst by the final reward form the pair).
    """

    name: str = "d3po"
    samples_per_prompt: int = 2

    def problems(self, config: SPOConfig) -> list[str]:
        problems = self.loss_problems()
        if not self.samples_per_prompt >= 2:
            problems.append(f"objective.samples_per_prompt must be >= 2 (a D3PO pair needs two trajectories), "
                            f"got {self.samples_per_prompt!r}")
        return problems


class D3POMethod(SPOMethod):
    """D3PO: ``objective.samples_per_prompt`` trajectories (2 in D3PO) from one x_T per prompt,
    the best and worst by the reward on the final image form the pair (unless tied), every step
    of both trains with the clamped-ratio DPO loss (``objective.beta``, ``objective.eps``)."""

    name = "d3po"
    config_class = D3POConfig

    @staticmethod
    def make_sampler(config: SPOConfig, backbone: Backbone, scorer: Any) -> PoolSampler:
        steps = config.sampling.num_inference_steps
        return PoolSampler(
            backbone, scorer,
            num_inference_steps=steps, eta=config.sampling.eta, guidance_scale=config.sampling.guidance_scale,
            k=config.objective.samples_per_prompt,
            threshold=0.0,  # D3PO keeps any strict preference; only equal rewards are ties
            divert_start_step=0, kappa=None, inner_steps=steps,  # one pool at x_T, branches run to the end
            resampler="random", pair="best_worst", decode_batch_size=config.sampling.decode_batch_size,
        )


METHOD = D3POMethod
