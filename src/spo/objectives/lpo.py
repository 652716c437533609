"""LPO: SPO's step-level preference optimisation with the diffusion model as its own judge.

Latent Preference Optimization (Zhang et al., NeurIPS 2025; ``lpo/train_scripts/train_lpo.py``
of the authors' release) keeps SPO's loss, its candidate pools and its random continuation, and
changes the judge and the pair rule:

- the pools are scored by a latent reward model (``preference.kind=latent``,
  :mod:`spo.preference.latent`) on the candidates' noisy latents x_{t-1} at the pool's t, with
  no VAE decode and no UNet pass on the branches (the next pass runs on the continuing candidate
  only);
- pools from the first step (``pools.divert_start_step: 0``: t up to 951, where SPO starts at
  751);
- a tie threshold that rises with the noise level (``pools.threshold_schedule: sigma``, 0.35 to
  0.5 for SD-1.5);
- beta 500 (SPO: 10).

The loss is SPO's (:func:`spo.objectives.spo.spo_loss`): the release's training loop is the SPO
release's, line for line (docs/release-parity.md lists the differences with file:line).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SPOConfig
from .spo import SPOMethod, SPOMethodConfig


@dataclass
class LPOConfig(SPOMethodConfig):
    """LPO's settings (``objective.*`` with ``objective.name: lpo``); the pools are ``pools.*``
    and the judge ``preference.*`` (``kind: latent``).

    Attributes:
        beta: Temperature of the DPO-style loss (the LPO release: 500).
        eps: Clamp of the policy/reference probability ratio (the release: 0.1).
        logprob_reduction: As SPO's (``"mean"``, the release).
        cfg: As SPO's (the release: true).
    """

    name: str = "lpo"
    beta: float = 500.0

    def problems(self, config: SPOConfig) -> list[str]:
        problems = super().problems(config)
        if config.preference.kind != "latent":
            problems.append(
                "objective.name=lpo scores its pools with a latent reward model: set preference.kind=latent "
                "(and preference.pretrained / preference.checkpoint to the LRM; the sd15-lpo, sdxl-lpo and toy-lpo "
                f"presets do), got preference.kind={config.preference.kind}"
            )
        return problems


class LPOMethod(SPOMethod):
    """LPO: SPO's pools and loss, judged on latents by the latent reward model."""

    name = "lpo"
    config_class = LPOConfig


METHOD = LPOMethod
