from baselines.prune.prune_main import PRUNEHyperParams, apply_prune_to_model, finish_prune, restrain

__all__ = ["PRUNEHyperParams", "apply_prune_to_model", "finish_prune", "restrain"]
