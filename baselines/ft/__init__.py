from baselines.ft.ft_main import FTHyperParams, apply_ft_to_model

__all__ = ["FTHyperParams", "apply_ft_to_model"]
