"""Caches owned by one editing run: context templates and second-moment statistics.

No module-level caches: a run creates one ``EditContext`` and passes it to every ``apply_*`` call,
so nothing leaks between runs or tests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from util.generate import generate_texts

LOG = logging.getLogger(__name__)

TEMPLATE_SEED_PROMPTS = ("The", "Therefore", "Because", "I", "You")


def generate_context_templates(model, tok, length_params: Sequence[Sequence[int]], seed: int = 0) -> List[List[str]]:
    """``[["{}"], [generated prefixes of length l1 ...], ...]`` (MEMIT's template groups).

    Each generated prefix is a short sampled continuation of a seed word, with braces removed and
    ``". {}"`` appended, so the request prompt follows a sentence the model itself wrote.
    """
    groups: List[List[str]] = [["{}"]]
    for length, count in length_params:
        prompts = [TEMPLATE_SEED_PROMPTS[i % len(TEMPLATE_SEED_PROMPTS)] for i in range(count)]
        texts = generate_texts(model, tok, prompts, max_new_tokens=length, do_sample=True, top_k=5, seed=seed)
        groups.append([t.replace("{", " ").replace("}", " ").replace("\n", " ").strip() + ". {}" for t in texts])
    LOG.info("context templates: %s", groups)
    return groups


@dataclass
class EditContext:
    """What an editing run computes once and reuses: templates, statistics, folders."""

    model_name: str
    stats_dir: Optional[Path] = None
    data_dir: Optional[Path] = None
    seed: int = 0
    _templates: Dict[Tuple, List[List[str]]] = field(default_factory=dict)
    _second_moments: Dict[Path, torch.Tensor] = field(default_factory=dict)
    _derived: Dict[Hashable, Any] = field(default_factory=dict)

    def derived(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """What a method derives from the statistics (AlphaEdit's projectors), computed or read once per run.
        ``key`` must name every setting the value depends on, as a cache file's path does."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def context_templates(self, model, tok, length_params) -> List[List[str]]:
        key = tuple(tuple(p) for p in length_params)
        if key not in self._templates:
            self._templates[key] = generate_context_templates(model, tok, length_params, seed=self.seed)
        return self._templates[key]

    def second_moments(self, model, tok, hparams, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
        """``{layer: C0}`` for the rewrite module of each layer, from memory, disk, or one new pass."""
        from rome.layer_stats import load_or_compute_second_moments, stats_file
        from util.paths import get_paths

        # The cache file's path names every setting the statistics depend on.
        key = lambda layer: stats_file(Path(self.stats_dir or get_paths().stats_dir), self.model_name, hparams, layer)
        missing = [layer for layer in layers if key(layer) not in self._second_moments]
        if missing:
            computed = load_or_compute_second_moments(
                model, tok, hparams, missing, self.model_name, stats_dir=self.stats_dir, data_dir=self.data_dir
            )
            for layer, value in computed.items():
                self._second_moments[key(layer)] = value
        return {layer: self._second_moments[key(layer)] for layer in layers}
