from baselines.alphaedit.alphaedit_main import (
    AlphaEditHyperParams, alphaedit_solver, apply_alphaedit_to_model, load_or_compute_projectors, nullspace_projector,
    projector_file,
)

__all__ = ["AlphaEditHyperParams", "alphaedit_solver", "apply_alphaedit_to_model", "load_or_compute_projectors",
           "nullspace_projector", "projector_file"]
