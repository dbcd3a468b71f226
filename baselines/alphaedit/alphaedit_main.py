"""AlphaEdit (Fang et al., 2025): MEMIT's round with the update projected into the null space of C0.

Keys of generic text lie (almost) in the span of C0's dominant eigenvectors. Restricting the update to
the orthogonal complement ``P = U_0 U_0^T`` (eigenvalues below ``nullspace_threshold``) leaves their
outputs untouched by construction, instead of merely penalising their change as MEMIT's ``lambda C0``
does. The update, in transposed form (``d_in x d_out``):

    ``Delta^T = (P (K K^T + C_prev) + L2 I)^{-1} P K R^T``

whose solution lies in the range of ``P``. ``P`` depends only on C0 and the threshold, so it is cached
on disk next to the statistics file.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from baselines.memit.memit_main import MEMITHyperParams
from editing.context import EditContext
from editing.layer_stats import stats_file
from editing.round import EditReport, locate_and_edit
from editing.sequential import SequentialState
from editing.update import Solver
from util.hparams import require
from util.io import atomic_torch_save
from util.models import model_device
from util.paths import get_paths

LOG = logging.getLogger(__name__)


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    # Eigenvalues of C0 below this span the null space the update may use.
    nullspace_threshold: float = 2e-2
    # Ridge term of the projected solve; keeps it well posed where P (K K^T + C_prev) is singular.
    L2: float = 10.0

    def validate(self, source: str) -> None:
        super().validate(source)
        require(self.mom2_adjustment, source, "mom2_adjustment",
                "must be true for AlphaEdit: the null-space projector is built from C0")
        require(self.nullspace_threshold > 0, source, "nullspace_threshold", "must be > 0")
        require(self.L2 > 0, source, "L2", "must be > 0 (the projected system is singular without it)")


def nullspace_projector(second_moment: torch.Tensor, threshold: float,
                        device: Optional[torch.device] = None) -> torch.Tensor:
    """``U_0 U_0^T`` (float64) over the eigenvectors of ``second_moment`` with eigenvalue < ``threshold``."""
    c0 = second_moment.to(device=device, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((c0 + c0.T) / 2)
    null_basis = eigenvectors[:, eigenvalues < threshold]
    return null_basis @ null_basis.T


def projector_file(stats_dir: Path, model_name: str, hparams: AlphaEditHyperParams, layer: int) -> Path:
    """Next to the layer's statistics file, named by it and by the threshold (so each setting has its own)."""
    statistics = stats_file(stats_dir, model_name, hparams, layer)
    return statistics.with_name(f"{statistics.stem}_nullspace{float(hparams.nullspace_threshold)!r}.pt")


def load_or_compute_projectors(
    model, hparams: AlphaEditHyperParams, second_moments: Dict[int, torch.Tensor], model_name: str,
    stats_dir: Optional[Path] = None,
) -> Dict[int, torch.Tensor]:
    """``{layer: P}`` (float32, CPU): read from the cache, or computed once and written atomically."""
    stats_dir = Path(stats_dir or get_paths().stats_dir)
    projectors: Dict[int, torch.Tensor] = {}
    for layer in hparams.layers:
        path = projector_file(stats_dir, model_name, hparams, layer)
        if path.exists():
            projectors[layer] = torch.load(path, map_location="cpu", weights_only=True)["projector"]
            LOG.debug("loaded the null-space projector of layer %d from %s", layer, path)
            continue
        start = time.perf_counter()
        projector = nullspace_projector(second_moments[layer], hparams.nullspace_threshold, model_device(model))
        # float32 halves the file and memory of large models; the solve casts back to float64.
        projectors[layer] = projector.float().cpu()
        dimension = int(round(float(projector.trace())))
        atomic_torch_save(path, {"projector": projectors[layer], "null_space_dimension": dimension,
                                 "threshold": hparams.nullspace_threshold, "module": hparams.rewrite_module(layer)})
        LOG.info("layer %d: null space of dimension %d of %d (threshold %g) in %.1fs, cached in %s", layer,
                 dimension, projector.shape[0], hparams.nullspace_threshold, time.perf_counter() - start, path)
    return projectors


def alphaedit_solver(hparams: AlphaEditHyperParams, projectors: Dict[int, torch.Tensor],
                     state: Optional[SequentialState]) -> Solver:
    """``Delta = [(P (K K^T + C_prev) + L2 I)^{-1} P K R^T]^T`` in float64 on the keys' device."""
    def solve(layer, keys, residuals):
        device = keys.device
        k = keys.double()
        p = projectors[layer].to(device, torch.float64)
        moment = k @ k.T
        prev = state.prev_moment(layer) if state is not None else None
        if prev is not None:
            moment = moment + prev.to(device, torch.float64)
        a = p @ moment
        a.diagonal().add_(hparams.L2)  # + L2 I without another d_in x d_in matrix
        return torch.linalg.solve(a, (p @ k) @ residuals.to(device, torch.float64).T).T

    return solve


def apply_alphaedit_to_model(
    model, tok, requests, hparams: AlphaEditHyperParams, context: EditContext,
    state: Optional[SequentialState] = None,
) -> EditReport:
    """Edit ``model`` in place; pass ``state`` for sequential editing (``C_prev`` of earlier rounds)."""
    def make_solver(hp, second_moments, st):
        # Kept for the run, so sequential rounds do not reread (d_in x d_in per layer) from disk.
        stats_dir = Path(context.stats_dir or get_paths().stats_dir)
        key = tuple(projector_file(stats_dir, context.model_name, hp, layer) for layer in hp.layers)
        projectors = context.derived(key, lambda: load_or_compute_projectors(
            model, hp, second_moments, context.model_name, context.stats_dir))
        return alphaedit_solver(hp, projectors, st)

    return locate_and_edit(model, tok, requests, hparams, context, state, make_solver=make_solver,
                           requests_per_loop=hparams.z_requests_per_loop)
