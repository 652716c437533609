"""The stochastic DDIM maths shared by sampling and training; knows no model."""

from .ddim import (
    PREDICTION_TYPES,
    DDIMStepOutput,
    PredictionType,
    ddim_log_prob,
    ddim_posterior,
    ddim_step,
    ddim_variance,
    epsilon_from_x0,
    expand_to,
    predict_x0_and_epsilon,
)
from .schedule import DDIMSchedule

__all__ = [
    "PREDICTION_TYPES",
    "DDIMSchedule",
    "DDIMStepOutput",
    "PredictionType",
    "ddim_log_prob",
    "ddim_posterior",
    "ddim_step",
    "ddim_variance",
    "epsilon_from_x0",
    "expand_to",
    "predict_x0_and_epsilon",
]
