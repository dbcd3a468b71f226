"""Curves over the number of edits: the state of a sequential run at each checkpoint (docs/DESIGN.md section 7).

At every downstream checkpoint (before the first round and after every ``--downstream_eval_steps`` rounds) the
driver writes ``run_NNN/curves/edits_NNNNNN.json`` with

* ``edits_so_far``: efficacy / generalization / specificity (success and magnitude, teacher forced, mean and
  95% interval in percent) of every record edited so far, scored on the model as it is now: the ``final``
  sense of AlphaEdit's Table 1 at that edit count. This is where a method that forgets earlier edits shows it.
  At the checkpoint after the last round this part is left out when the run's ``final`` evaluation follows
  (the same model, already scored record by record; summarize.py takes the last point from it).
* ``perplexity_unedited`` / ``perplexity_edited`` on WikiText chunks the statistics did not use, and per
  edited module the accumulated edit ``dW = W - W_0``: its Frobenius norm, its largest singular value, that
  value over ``W_0``'s (PRUNE's bound is 1), and the relative change of the module's output on the generic
  keys (experiments/edit_drift.py).

``summarize.py --plot`` draws them, with the downstream scores, per run and as an overlay of runs.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from experiments.metrics import (COUNTERFACT, MAGNITUDE_METRICS, SUCCESS_METRICS, counterfact_case_metrics,
                                 detect_dataset, summarize_stage, zsre_case_metrics)
from util.io import atomic_write_json
from util.weights import snapshot_weights, temporarily_loaded

LOG = logging.getLogger(__name__)

CURVES_FOLDER = "curves"
PERPLEXITY_CHUNKS = 32  # WikiText chunks of 128 tokens per checkpoint: about 20 s on a 2-core CPU for 135M
PERPLEXITY_CHUNK_LENGTH = 128


def curve_point_path(run_dir: Path, edit_count: int) -> Path:
    return Path(run_dir) / CURVES_FOLDER / f"edits_{int(edit_count):06d}.json"


def load_curve(run_dir: Path) -> List[dict]:
    """The run's curve points, by edit count (empty for runs without checkpoints)."""
    folder = Path(run_dir) / CURVES_FOLDER
    points = [json.loads(path.read_text()) for path in sorted(folder.glob("edits_*.json"))] if folder.is_dir() else []
    return sorted(points, key=lambda point: point["edit_count"])


def edits_so_far_summary(stages: Sequence[dict]) -> Optional[dict]:
    """E / G / S (success and magnitude) over the records' metrics of one stage, as summarize.py aggregates them."""
    if not stages:
        return None
    dataset = detect_dataset(stages[0])
    case_metrics = counterfact_case_metrics if dataset == COUNTERFACT else zsre_case_metrics
    summary = summarize_stage([case_metrics(stage, "edits_so_far") for stage in stages], dataset, "edits_so_far")
    keys = ("n_cases", "score", *SUCCESS_METRICS, *(MAGNITUDE_METRICS if dataset == COUNTERFACT else ()))
    return {key: summary[key] for key in keys}


def statistics_chunks(hparams, chunk_length: int = PERPLEXITY_CHUNK_LENGTH) -> int:
    """How many leading WikiText chunks of ``chunk_length`` tokens the method's statistics may have read."""
    tokens = int(getattr(hparams, "mom2_n_samples", 0) or 0) * int(getattr(hparams, "mom2_sample_length", 0) or 0)
    return -(-tokens // chunk_length)


class GenericText:
    """The WikiText chunks after those the statistics used, tokenized once per run."""

    def __init__(self, tok, statistics_chunks: int, data_dir=None, n_chunks: int = PERPLEXITY_CHUNKS,
                 chunk_length: int = PERPLEXITY_CHUNK_LENGTH):
        self.tok, self.skip, self.data_dir = tok, statistics_chunks, data_dir
        self.n_chunks, self.chunk_length = n_chunks, chunk_length
        self._chunks: Optional[torch.Tensor] = None

    @property
    def chunks(self) -> torch.Tensor:
        if self._chunks is None:
            from experiments.edit_drift import generic_chunks

            self._chunks = generic_chunks(self.tok, self.skip, self.n_chunks, self.chunk_length, self.data_dir)
        return self._chunks


def curve_point(model, tok, evaluator, records_so_far: Sequence[dict], original_weights: Dict[str, torch.Tensor],
                generic_text: GenericText) -> dict:
    """The measurements of the module docstring on the model as it is (edited), against ``original_weights``."""
    from experiments.edit_drift import edit_drift

    start = time.perf_counter()
    point: dict = {"edits_so_far": None}
    if records_so_far:
        point["edits_so_far"] = edits_so_far_summary(evaluator.teacher_forced(model, tok, records_so_far))
    edited = snapshot_weights(model, list(original_weights))
    with temporarily_loaded(model, original_weights):
        drift = edit_drift(model, generic_text.chunks, [edited], progress=False)[0]
    point.update(drift)
    point["seconds"] = time.perf_counter() - start
    return point


def write_curve_point(run_dir: Path, edit_count: int, round_index: int, point: dict) -> Path:
    path = curve_point_path(run_dir, edit_count)
    atomic_write_json(path, {"edit_count": int(edit_count), "round": round_index,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **point})
    return path
