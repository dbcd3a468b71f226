from baselines.prune.prune_main import PRUNEHyperParams, apply_prune_to_model, restrain_edit

__all__ = ["PRUNEHyperParams", "apply_prune_to_model", "restrain_edit"]
