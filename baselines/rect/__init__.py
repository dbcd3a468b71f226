from baselines.rect.rect_main import RECTHyperParams, apply_rect_to_model, keep_top_relative_entries

__all__ = ["RECTHyperParams", "apply_rect_to_model", "keep_top_relative_entries"]
