"""The editing algorithms the driver and the benchmark know: hparams class, entry point, protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Type

from util.errors import SettingError
from util.hparams import HyperParams


@dataclass(frozen=True)
class Algorithm:
    name: str
    hparams_class: Type[HyperParams]
    apply: Callable  # apply(model, tok, requests, hparams, context, state) -> EditReport
    sequential_by_default: bool
    # Whether the method gets a SequentialState (rounds, PRUNE's originals) when run sequentially.
    uses_sequential_state: bool
    # Whether that state keeps C_prev, the keys of earlier rounds, for the solve.
    keeps_prev_moments: bool = False
    hparams_folder: str = ""  # hparams/<folder>/; defaults to the algorithm's name
    # finish(model, hparams, state): run once after the last round of a sequential run (PRUNE applied once).
    finish: Optional[Callable] = None
    # check_requests(requests, hparams): raise before the first round for requests these hparams cannot edit.
    check_requests: Optional[Callable] = None

    @property
    def hparams_dir_name(self) -> str:
        return self.hparams_folder or self.name


def _registry():
    from functools import partial

    from baselines.alphaedit import AlphaEditHyperParams, apply_alphaedit_to_model
    from baselines.ft import FTHyperParams, apply_ft_to_model
    from baselines.memit import MEMITHyperParams, apply_memit_to_model
    from baselines.prune import PRUNEHyperParams, apply_prune_to_model, finish_prune
    from baselines.rect import RECTHyperParams, apply_rect_to_model
    from ece import SCORE_METHODS, ECEHyperParams, apply_ece_to_model, check_ece_requests
    from rome.rome_main import ROMEHyperParams, apply_rome_to_model

    algorithms = [
        Algorithm("ROME", ROMEHyperParams, apply_rome_to_model, sequential_by_default=False,
                  uses_sequential_state=False),
        # MEMIT --sequential keeps the edits but not C_prev: AlphaEdit's "MEMIT" row, the one that collapses.
        Algorithm("MEMIT", MEMITHyperParams, apply_memit_to_model, sequential_by_default=False,
                  uses_sequential_state=True),
        Algorithm("MEMIT_seq", MEMITHyperParams, apply_memit_to_model, sequential_by_default=True,
                  uses_sequential_state=True, keeps_prev_moments=True, hparams_folder="MEMIT"),
        Algorithm("FT", FTHyperParams, apply_ft_to_model, sequential_by_default=False, uses_sequential_state=False),
        Algorithm("AlphaEdit", AlphaEditHyperParams, apply_alphaedit_to_model, sequential_by_default=True,
                  uses_sequential_state=True, keeps_prev_moments=True),
        Algorithm("MEMIT_prune", PRUNEHyperParams, apply_prune_to_model, sequential_by_default=True,
                  uses_sequential_state=True, finish=finish_prune),
        Algorithm("MEMIT_rect", RECTHyperParams, apply_rect_to_model, sequential_by_default=True,
                  uses_sequential_state=True),
    ]
    # The four neuron scores share one hparams folder: the files are the same for all of them.
    algorithms += [Algorithm(f"ECE_{method}", ECEHyperParams, partial(apply_ece_to_model, method=method),
                             sequential_by_default=True, uses_sequential_state=True, keeps_prev_moments=True,
                             hparams_folder="ECE", check_requests=check_ece_requests)
                   for method in SCORE_METHODS]
    return {a.name: a for a in algorithms}


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm; :class:`SettingError` listing the registered names for any other name."""
    registry = _registry()
    if name not in registry:
        raise SettingError(f"unknown algorithm '{name}'. Available: {', '.join(sorted(registry))}.")
    return registry[name]


def algorithm_names():
    return sorted(_registry())
