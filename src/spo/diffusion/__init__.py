"""The stochastic DDIM and flow-SDE maths shared by sampling and training; knows no model."""

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
from .flow import flow_sde_posterior, flow_sde_std, flow_x0
from .schedule import DDIMSchedule, FlowSDESchedule, Schedule, is_flow_config, schedule_from_config

__all__ = [
    "PREDICTION_TYPES",
    "DDIMSchedule",
    "DDIMStepOutput",
    "FlowSDESchedule",
    "Schedule",
    "PredictionType",
    "ddim_log_prob",
    "ddim_posterior",
    "ddim_step",
    "ddim_variance",
    "epsilon_from_x0",
    "expand_to",
    "flow_sde_posterior",
    "flow_sde_std",
    "flow_x0",
    "is_flow_config",
    "predict_x0_and_epsilon",
    "schedule_from_config",
]
