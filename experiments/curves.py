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
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from experiments.metrics import (COUNTERFACT, MAGNITUDE_METRICS, SUCCESS_METRICS, counterfact_case_metrics,
                                 detect_dataset, summarize_stage, zsre_case_metrics)
from util.io import atomic_write_json

if TYPE_CHECKING:  # summarize.py reads the curves without loading torch
    import torch

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
    """How many leading WikiText chunks of ``chunk_length`` tokens the method's statistics may have read (none
    when they come from another corpus, as the published files' ``wikipedia``)."""
    if getattr(hparams, "mom2_dataset", "wikitext") != "wikitext":
        return 0
    tokens = int(getattr(hparams, "mom2_n_samples", 0) or 0) * int(getattr(hparams, "mom2_sample_length", 0) or 0)
    return -(-tokens // chunk_length)


class GenericText:
    """The WikiText chunks after those the statistics used, tokenized once per run."""

    def __init__(self, tok, statistics_chunks: int, data_dir=None, n_chunks: int = PERPLEXITY_CHUNKS,
                 chunk_length: int = PERPLEXITY_CHUNK_LENGTH):
        self.tok, self.skip, self.data_dir = tok, statistics_chunks, data_dir
        self.n_chunks, self.chunk_length = n_chunks, chunk_length
        self._chunks: Optional[torch.Tensor] = None
        self.unavailable: Optional[str] = None  # why there is no held-out text, once known

    @property
    def chunks(self) -> Optional[torch.Tensor]:
        """The chunks, or None (with ``unavailable`` saying why and one warning) when the corpus has too few."""
        if self._chunks is None and self.unavailable is None:
            from editing.layer_stats import CorpusNotFoundError
            from experiments.edit_drift import generic_chunks
            from util.errors import ECEError

            try:
                self._chunks = generic_chunks(self.tok, self.skip, self.n_chunks, self.chunk_length, self.data_dir)
            except (ECEError, CorpusNotFoundError) as e:
                self.unavailable = str(e)
                LOG.warning("no perplexity in the curve points: %s", e)
        return self._chunks


def curve_point(model, tok, evaluator, records_so_far: Sequence[dict], original_weights: Dict[str, torch.Tensor],
                generic_text: GenericText) -> dict:
    """The measurements of the module docstring on the model as it is (edited), against ``original_weights``."""
    from experiments.edit_drift import edit_drift, edit_norms
    from util.weights import snapshot_weights, temporarily_loaded

    start = time.perf_counter()
    point: dict = {"edits_so_far": None}
    if records_so_far:
        point["edits_so_far"] = edits_so_far_summary(evaluator.teacher_forced(model, tok, records_so_far))
    edited = snapshot_weights(model, list(original_weights))
    if generic_text.chunks is None:
        original = {name: weight.double() for name, weight in original_weights.items()}
        change = {name: edited[name].double() - original[name] for name in original}
        point.update(edit_norms(change, original), perplexity_unavailable=generic_text.unavailable)
    else:
        with temporarily_loaded(model, original_weights):
            point.update(edit_drift(model, generic_text.chunks, [edited], progress=False)[0])
    point["seconds"] = time.perf_counter() - start
    return point


def write_curve_point(run_dir: Path, edit_count: int, round_index: int, point: dict) -> Path:
    path = curve_point_path(run_dir, edit_count)
    atomic_write_json(path, {"edit_count": int(edit_count), "round": round_index,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **point})
    return path


# ----------------------------------------------------------------------------------------------------
# Series and pictures (summarize.py --plot)
# ----------------------------------------------------------------------------------------------------

def _short_layer(name: str) -> str:
    digits = [part for part in name.split(".") if part.isdigit()]
    return f"layer {digits[0]}" if digits else name


def run_series(points: Sequence[dict], summary: dict) -> dict:
    """What the pictures draw for one run (``points``: its ``load_curve``): ``{"label", "quality": {metric:
    [(edits, %)]}, "perplexity", "downstream": {task: [(edits, accuracy)]}, "edit_norm" / "edit_spectral_norm" /
    "edit_spectral_ratio" / "relative_output_change": {layer: [(edits, value)]}}``. The last quality point comes
    from the ``final`` stage when the run's last checkpoint left it to that evaluation."""
    series: dict = {"label": f"{summary.get('alg_name')} {summary['run']}", "perplexity": [], "downstream": {},
                    "quality": {metric: [] for metric in SUCCESS_METRICS}}
    per_layer = ("edit_norm", "edit_spectral_norm", "edit_spectral_ratio", "relative_output_change")
    for key in per_layer:
        series[key] = {}
    for point in points:
        count = point["edit_count"]
        for metric in SUCCESS_METRICS:
            value = (point.get("edits_so_far") or {}).get(metric)
            if value is not None:
                series["quality"][metric].append((count, value["mean"]))
        if point.get("perplexity_edited") is not None:
            series["perplexity"].append((count, point["perplexity_edited"]))
        for key in per_layer:
            for name, value in point.get(key, {}).items():
                series[key].setdefault(_short_layer(name), []).append((count, value))
    final = summary.get("stages", {}).get("final")
    if final is not None:
        count = summary["n_cases"]
        for metric in SUCCESS_METRICS:
            if final.get(metric) is not None and all(x != count for x, _ in series["quality"][metric]):
                series["quality"][metric].append((count, final[metric]["mean"]))
    for row in summary.get("downstream") or []:
        for task, values in row["tasks"].items():
            if "accuracy" in values:
                series["downstream"].setdefault(task, []).append((row["edit_count"], 100.0 * values["accuracy"]))
    return series


def curve_rows(series: dict) -> List[dict]:
    """The series as table rows by edit count: E / G / S of the edits so far, perplexity, largest spectral ratio
    over the edited layers, mean downstream accuracy (None where a point has no value)."""
    counts = sorted({x for points in (*series["quality"].values(), series["perplexity"],
                                      *series["downstream"].values()) for x, _ in points})
    lookup = lambda points, count: next((y for x, y in points if x == count), None)
    rows = []
    for count in counts:
        ratios = [lookup(points, count) for points in series["edit_spectral_ratio"].values()]
        accuracies = [lookup(points, count) for points in series["downstream"].values()]
        accuracies = [a for a in accuracies if a is not None]
        rows.append({"edit_count": count, **{m: lookup(series["quality"][m], count) for m in SUCCESS_METRICS},
                     "perplexity": lookup(series["perplexity"], count),
                     "max_spectral_ratio": max((r for r in ratios if r is not None), default=None),
                     "downstream_accuracy": sum(accuracies) / len(accuracies) if accuracies else None})
    return rows


def _draw(ax, lines: Dict[str, list], title: str, ylabel: str, log: bool = False) -> None:
    """``log``: a logarithmic y axis (perplexity, which grows by orders of magnitude when a model breaks)."""
    for label, points in lines.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("edits made")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(lines.values()):
        ax.legend(fontsize=7)
        if log:
            ax.set_yscale("log")


def plot_run_curves(series: dict, out: Path) -> Path:
    """One run: quality of the edits so far, downstream accuracy, perplexity and the accumulated edit per layer."""
    from matplotlib.figure import Figure

    from util.io import atomic_write_png

    fig = Figure(figsize=(15, 8))
    axes = fig.subplots(2, 3).ravel()
    _draw(axes[0], series["quality"], "edits so far, scored now (teacher forced)", "success rate (%)")
    _draw(axes[1], series["downstream"], "downstream tasks", "accuracy (%)")
    _draw(axes[2], {"WikiText (held out)": series["perplexity"]}, "perplexity (log scale)", "perplexity", log=True)
    _draw(axes[3], series["edit_norm"], "accumulated edit ||W - W0||_F", "Frobenius norm")
    _draw(axes[4], series["edit_spectral_ratio"], "largest singular value of W - W0, over W0's", "ratio")
    _draw(axes[5], series["relative_output_change"], "edited module's output change on generic text",
          "relative change")
    fig.suptitle(f"Sequential edits: {series['label']}")
    fig.tight_layout()
    atomic_write_png(fig, out, dpi=110)
    return out


def plot_overlay(all_series: Sequence[dict], out: Path) -> Path:
    """Several runs on the same axes: the quality of the edits so far, mean downstream accuracy, perplexity and
    the largest spectral ratio over the edited layers."""
    from matplotlib.figure import Figure

    from util.io import atomic_write_png

    def mean_downstream(series: dict) -> list:
        by_count: Dict[int, list] = {}
        for points in series["downstream"].values():
            for count, value in points:
                by_count.setdefault(count, []).append(value)
        return [(count, sum(v) / len(v)) for count, v in sorted(by_count.items())]

    def largest(series: dict, key: str) -> list:
        by_count: Dict[int, float] = {}
        for points in series[key].values():
            for count, value in points:
                by_count[count] = max(by_count.get(count, 0.0), value)
        return sorted(by_count.items())

    fig = Figure(figsize=(15, 8))
    axes = fig.subplots(2, 3).ravel()
    for ax, metric in zip(axes[:3], SUCCESS_METRICS):
        _draw(ax, {s["label"]: s["quality"][metric] for s in all_series}, f"{metric} of the edits so far",
              "success rate (%)")
    _draw(axes[3], {s["label"]: mean_downstream(s) for s in all_series}, "downstream accuracy (mean over tasks)",
          "accuracy (%)")
    _draw(axes[4], {s["label"]: s["perplexity"] for s in all_series}, "WikiText perplexity (held out, log scale)",
          "perplexity", log=True)
    _draw(axes[5], {s["label"]: largest(s, "edit_spectral_ratio") for s in all_series},
          "largest s(W - W0) / s(W0) over the edited layers", "ratio")
    fig.suptitle("Sequential edits, all runs")
    fig.tight_layout()
    atomic_write_png(fig, out, dpi=110)
    return out
