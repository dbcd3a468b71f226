from baselines.memit.memit_main import MEMITHyperParams, apply_memit_to_model

__all__ = ["MEMITHyperParams", "apply_memit_to_model"]
