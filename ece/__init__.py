"""ECE: explainable neuron selection, clustering of similar facts, one batched target loop per cluster."""
from ece.ece_main import SCORE_METHODS, apply_ece_to_model, check_ece_requests
from ece.hparams import ECEHyperParams

__all__ = ["ECEHyperParams", "SCORE_METHODS", "apply_ece_to_model", "check_ece_requests"]
