"""Preference objectives: small functions of transition log-probs."""

from .spo import SPOLossOutput, SPOObjective, spo_loss, transition_log_probs

__all__ = ["SPOLossOutput", "SPOObjective", "spo_loss", "transition_log_probs"]
