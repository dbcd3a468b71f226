"""Summarise editing runs: one table row per run and evaluation stage, downstream curves, JSON output.

Usage::

    python summarize.py --dir_name=MEMIT --runs=run_000,run_001 [--json] [--plot] [--results_dir PATH]
    python summarize.py --dir_name=ECE_WI --runs=run_000 --explain [--plot] [--json]
    python summarize.py --compare ECE_WI/run_000 MEMIT_seq/run_000 [--plot] [--json]

Without ``--runs`` every ``run_NNN`` folder under ``<results_dir>/<dir_name>/`` is summarised.

What is computed (docs/DESIGN.md section 7; the per-case metrics and their aggregation live in
``experiments/metrics.py``, shared with the benchmark), separately for each evaluation stage of a case file:
``pre`` (unedited model), ``post`` (right after the case's editing round) and ``final`` (on the model after
the last round of a sequential run).

* CounterFact (``*_prompts_probs``: lists of ``{"target_new": NLL, "target_true": NLL}``), per case:
  efficacy / generalization success = mean over rewrite / paraphrase prompts of ``[NLL_true > NLL_new]``,
  specificity success = mean over neighbourhood prompts of ``[NLL_true < NLL_new]`` (ties count as failures);
  efficacy / generalization magnitude = mean of ``exp(-NLL_new) - exp(-NLL_true)``, specificity magnitude =
  mean of ``exp(-NLL_true) - exp(-NLL_new)``. Fluency = ``ngram_entropy``, Consistency = ``reference_score``.
  Both depend on how the texts were generated (``generation_protocol`` in the case files: ``published`` =
  MEMIT's top-k 5 sampling of 100 tokens, ``greedy``) and Consistency on its references and tf-idf statistics
  (``consistency_source``: published, or the WikiText+CounterFact substitute). The table names both; cases of
  one stage generated with different protocols, or scored with different sources, are not averaged together
  (the metric is left empty, with a warning and a note).
* zsRE (``*_prompts_correct``: per prompt a list of per-token booleans), per case: accuracy = mean over prompts
  of the prompt's mean token correctness.
* Free generation, both datasets (``*_prompts_generated_correct``, experiments/free_generation.py): per case the
  share of rewrite / paraphrase / neighbourhood prompts whose greedy answer begins with the expected target
  (``target_new``; ``target_true`` for neighbourhood prompts) and does not name the competing one after it:
  the columns "Eff. free", "Gen. free", "Spec. free". Runs evaluated before the metric existed show "-".
  The JSON also has CounterFact's teacher-forced top-1 rates (``efficacy_top1`` ...: every target token top-1).
* Per run and stage: the mean over cases and the 95% interval ``mean +- 1.96 * std / sqrt(n)`` (``std`` is
  the sample standard deviation, ``ddof=1``; no interval for a single case), all in percent. Fluency and
  Consistency are multiplied by 100 too, the scale of the MEMIT / AlphaEdit / ECE tables (fluency ~ 620).
  Score = harmonic mean of the efficacy, generalization and specificity success means.
* Edit time: one ``time`` per round (cases grouped by ``grouped_case_ids``): mean per round and total.
* ``run_NNN/glue_eval/*.json`` (downstream checks): each task's metrics over ``edit_count``; ``--plot`` writes
  ``run_NNN/downstream.png``.
* ``run_NNN/curves/*.json`` (sequential runs, experiments/curves.py): the edits so far scored at each checkpoint,
  perplexity and the accumulated edit; ``--plot`` writes ``run_NNN/curves.png``.
* ``--compare ALG/run_NNN ...``: runs of several methods in AlphaEdit's Table 1 layout; ``--plot`` also writes
  ``compare_curves.png`` (all runs on the same axes) into the results directory.
* ``--explain`` (ECE runs): for each ``explanation_round_NNN.json`` the selected neurons and mass share per
  layer, the clusters (size, mean Jaccard, relations, loops) and the neurons most often among their members'
  top neurons per layer; with ``--plot``, ``explanation_round_NNN.png`` (requests x first-layer top neurons).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments.metrics import (CF_KEYS, COUNTERFACT, FREE_METRICS, MIXED, ZSRE, ZSRE_KEYS, as_number,
                                 counterfact_case_metrics, describe_protocol, detect_dataset, generation_protocol_of,
                                 protocol_identity, summarize_stage, zsre_case_metrics)
from experiments.curves import curve_rows, load_curve, run_series
from util.cli import add_verbose_argument, run_script, setup_logging
from util.errors import ECEError

logger = logging.getLogger("summarize")

STAGES = ("pre", "post", "final")
STAGE_LABELS = {
    "pre": "pre (unedited model)",
    "post": "post (right after each case's round)",
    "final": "final (model after the last round)",
}
RUN_RE = re.compile(r"run_(\d+)")
CASE_RE = re.compile(r"(\d+)_edits-case_(.+)\.json")

FREE_HEADERS = ("Eff. free", "Gen. free", "Spec. free")
DOWNSTREAM_METRIC_ORDER = ("accuracy", "f1", "mcc")
DOWNSTREAM_PLOT_NAME = "downstream.png"
CURVES_PLOT_NAME = "curves.png"  # experiments/curves.py
COMPARE_PLOT_NAME = "compare_curves.png"
EXPLANATION_RE = re.compile(r"explanation_round_(\d+)\.json")  # experiments/driver.py explanation_path
EXPLAIN_TOP_NEURONS = 8  # per cluster and layer in the --explain view
EXPLAIN_PLOT_NEURONS = 80  # columns of the heatmap at most: the most listed neurons


class SummarizeError(ECEError):
    """A results folder, run or file that cannot be summarised; the message names the path."""


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def available_runs(alg_dir: Path) -> list[str]:
    """``run_NNN`` folders of ``alg_dir`` in numeric order (hidden and temporary entries ignored)."""
    if not alg_dir.is_dir():
        return []
    runs = [p for p in alg_dir.iterdir() if _visible(p) and p.is_dir() and RUN_RE.fullmatch(p.name)]
    return [p.name for p in sorted(runs, key=lambda p: (int(RUN_RE.fullmatch(p.name).group(1)), p.name))]


def _normalise_run_names(runs: str | Sequence[str]) -> list[str]:
    tokens = runs.split(",") if isinstance(runs, str) else list(runs)
    names: list[str] = []
    for token in tokens:
        token = str(token).strip()
        if not token:
            continue
        if token.isdigit():
            token = f"run_{int(token):03d}"
        if token not in names:
            names.append(token)
    return names


def resolve_runs(alg_dir: Path, runs: str | Sequence[str] | None) -> list[Path]:
    """The run folders to summarise; :class:`SummarizeError` naming the path and the available runs."""
    if not alg_dir.is_dir():
        parent = alg_dir.parent
        if parent.is_dir():
            algs = sorted(p.name for p in parent.iterdir() if _visible(p) and p.is_dir())
            hint = f"folders available in {parent}: {', '.join(algs) if algs else 'none'}"
        else:
            hint = f"the results directory {parent} does not exist (use --results_dir or ECE_RESULTS_DIR)"
        raise SummarizeError(f"results folder not found: {alg_dir}; {hint}")
    available = available_runs(alg_dir)
    shown = ", ".join(available) if available else "none"
    if runs is None or (isinstance(runs, str) and not runs.strip()):
        if not available:
            raise SummarizeError(f"no run_NNN folders in {alg_dir}")
        return [alg_dir / name for name in available]
    names = _normalise_run_names(runs)
    if not names:
        raise SummarizeError(f"no run names given; runs available in {alg_dir}: {shown}")
    missing = [name for name in names if name not in available]
    if missing:
        raise SummarizeError(
            f"run(s) not found in {alg_dir}: {', '.join(missing)}; runs available: {shown}"
        )
    return [alg_dir / name for name in names]


def _load_json(path: Path, kind: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SummarizeError(f"corrupt {kind} {path}: {exc}") from None
    except OSError as exc:
        raise SummarizeError(f"cannot read {kind} {path}: {exc}") from None


def _case_sort_key(path: Path) -> tuple:
    case_id = CASE_RE.fullmatch(path.name).group(2)
    return (0, int(case_id), "") if case_id.isdigit() else (1, 0, case_id)


def case_files(run_dir: Path) -> list[Path]:
    files = [p for p in run_dir.iterdir() if _visible(p) and p.is_file() and CASE_RE.fullmatch(p.name)]
    return sorted(files, key=_case_sort_key)


def load_params(run_dir: Path) -> dict:
    path = run_dir / "params.json"
    if not path.exists():
        logger.warning("%s has no params.json; run details will be missing", run_dir)
        return {}
    params = _load_json(path, "params file")
    if not isinstance(params, dict):
        raise SummarizeError(f"corrupt params file {path}: expected a JSON object, got {type(params).__name__}")
    return params


def _read_case(path: Path) -> tuple[dict, str, dict[str, dict]]:
    """The case record, its dataset type and its per-stage metrics."""
    record = _load_json(path, "case file")
    try:
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        stages = {s: record[s] for s in STAGES if record.get(s) is not None}
        if not stages:
            raise ValueError("no 'pre', 'post' or 'final' metrics")
        dataset = None
        metrics: dict[str, dict] = {}
        for stage_name, stage in stages.items():
            if not isinstance(stage, dict):
                raise ValueError(f"'{stage_name}' must be a JSON object, got {type(stage).__name__}")
            found = detect_dataset(stage)
            if found is None:
                raise ValueError(
                    f"'{stage_name}' has neither CounterFact keys ({', '.join(CF_KEYS.values())}) "
                    f"nor zsRE keys ({', '.join(ZSRE_KEYS.values())})"
                )
            if dataset is not None and found != dataset:
                raise ValueError(f"'{stage_name}' holds {found} metrics but another stage holds {dataset}")
            dataset = found
            if found == COUNTERFACT:
                m = counterfact_case_metrics(stage, stage_name)
                m["_fluency_key"] = "ngram_entropy" in stage
                m["_consistency_key"] = "reference_score" in stage
                m["_generation_protocol"] = generation_protocol_of(stage, stage_name)
                m["_consistency_source"] = stage.get("consistency_source")
                m["_generation_prompts_source"] = stage.get("generation_prompts_source")
            else:
                m = zsre_case_metrics(stage, stage_name)
            m["_free_generation"] = stage.get("free_generation")
            metrics[stage_name] = m
        if record.get("time") is not None:
            as_number(record["time"], "'time'")
        grouped = record.get("grouped_case_ids")
        if grouped is not None and not isinstance(grouped, list):
            raise ValueError(f"'grouped_case_ids' must be a list, got {grouped!r}")
    except ValueError as exc:
        raise SummarizeError(f"corrupt case file {path}: {exc}") from None
    return record, dataset, metrics


def edit_rounds(records: list[tuple[Path, dict]]) -> dict:
    """Number of rounds and their edit time (one ``time`` per round, cases grouped by ``grouped_case_ids``)."""
    rounds: dict[tuple, float | None] = {}
    for path, record in records:
        grouped = record.get("grouped_case_ids")
        key = tuple(sorted(map(str, grouped))) if grouped else (str(record.get("case_id", path.name)),)
        time = record.get("time")
        time = None if time is None else float(time)
        if key not in rounds or rounds[key] is None:
            rounds[key] = time
        elif time is not None and not math.isclose(rounds[key], time, rel_tol=1e-6, abs_tol=1e-9):
            logger.warning(
                "%s: time %.4g differs from %.4g recorded by another case of the same round; keeping the first",
                path, time, rounds[key],
            )
    times = [t for t in rounds.values() if t is not None]
    if len(times) < len(rounds):
        logger.warning("%d of %d rounds have no recorded time", len(rounds) - len(times), len(rounds))
    return {
        "n_rounds": len(rounds),
        "n_timed_rounds": len(times),
        "time_per_round": float(np.mean(times)) if times else None,
        "time_total": float(np.sum(times)) if times else None,
    }


def load_downstream(run_dir: Path) -> list[dict] | None:
    """Rows ``{"edit_count", "file", "tasks": {task: {metric: value}}}`` sorted by ``edit_count``, or
    ``None`` when the run has no ``glue_eval`` folder."""
    folder = run_dir / "glue_eval"
    if not folder.is_dir():
        return None
    rows: dict[float, dict] = {}
    for path in sorted(p for p in folder.glob("*.json") if _visible(p) and p.is_file()):
        data = _load_json(path, "downstream file")
        try:
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            if "edit_count" not in data:
                raise ValueError("no 'edit_count'")
            edit_count = as_number(data["edit_count"], "'edit_count'")
            tasks = data.get("tasks")
            if not isinstance(tasks, dict):
                raise ValueError(f"'tasks' must be a JSON object of task -> metrics, got {tasks!r}")
            parsed: dict[str, dict[str, float]] = {}
            for task, values in tasks.items():
                if not isinstance(values, dict):
                    raise ValueError(f"'tasks.{task}' must be a JSON object of metrics, got {values!r}")
                parsed[task] = {
                    k: float(v) for k, v in values.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
        except ValueError as exc:
            raise SummarizeError(f"corrupt downstream file {path}: {exc}") from None
        if edit_count.is_integer():
            edit_count = int(edit_count)
        if edit_count in rows:
            logger.warning(
                "%s and %s both hold edit_count %s; keeping %s",
                rows[edit_count]["file"], path, edit_count, path,
            )
        rows[edit_count] = {"edit_count": edit_count, "file": str(path), "tasks": parsed}
    return [rows[k] for k in sorted(rows)]


def summarize_run(run_dir: Path) -> dict:
    """Summary of one run folder (see :func:`summarize`)."""
    params = load_params(run_dir)
    files = case_files(run_dir)
    records: list[tuple[Path, dict]] = []
    per_stage: dict[str, list[dict]] = {s: [] for s in STAGES}
    dataset = None
    seen_ids: dict[str, Path] = {}
    for path in files:
        record, found, metrics = _read_case(path)
        if dataset is not None and found != dataset:
            raise SummarizeError(
                f"corrupt case file {path}: holds {found} metrics but earlier case files of {run_dir} hold {dataset}"
            )
        dataset = found
        case_id = str(record.get("case_id", CASE_RE.fullmatch(path.name).group(2)))
        if case_id in seen_ids:
            logger.warning("case %s appears in both %s and %s", case_id, seen_ids[case_id].name, path.name)
        seen_ids[case_id] = path
        records.append((path, record))
        for stage_name, m in metrics.items():
            per_stage[stage_name].append(m)
    if not files:
        logger.warning("%s has no case files", run_dir)
    stages = {s: summarize_stage(per_stage[s], dataset, s) for s in STAGES if per_stage[s]}
    for s in STAGES:
        if per_stage[s] and len(per_stage[s]) < len(files):
            stages[s]["notes"].append(f"{s} metrics present in {len(per_stage[s])} of {len(files)} case files")
        protocol = stages[s].get("generation_protocol") if s in stages else None
        asked = params.get("generation_protocol")
        if protocol is not None and asked is not None and protocol["name"] not in (asked, MIXED):
            stages[s]["notes"].append(f"params.json asks for the {asked} generation protocol but the case files "
                                      f"record {protocol['name']}")
    summary = {
        "run": run_dir.name,
        "path": str(run_dir),
        "alg_name": params.get("alg_name"),
        "model_name": params.get("model_name"),
        "ds_name": params.get("ds_name"),
        "num_edits": params.get("num_edits"),
        "sequential": params.get("sequential"),
        "generation_protocol": params.get("generation_protocol"),
        "dataset": dataset,
        "n_cases": len(files),
        **edit_rounds(records),
        "stages": stages,
        "downstream": load_downstream(run_dir),
        "downstream_plot": None,
    }
    points = load_curve(run_dir)
    summary["curve"] = curve_rows(run_series(points, summary)) if points else None
    summary["curve_points"] = points
    return summary


def summarize(
    dir_name: str,
    runs: str | Sequence[str] | None = None,
    results_dir: str | Path | None = None,
) -> list[dict]:
    """Summaries of the runs of ``<results_dir>/<dir_name>/``, one dict per run, in the order asked
    (all ``run_NNN`` folders in numeric order when ``runs`` is ``None``).

    Each dict holds the run's details (``run``, ``path``, ``alg_name``, ``model_name``, ``ds_name``,
    ``num_edits``, ``sequential``, ``dataset``), ``n_cases``, ``n_rounds``, ``time_per_round``, ``time_total``,
    ``stages`` (``{"pre"|"post"|"final": stage}``, only the stages present) and ``downstream`` (rows from
    ``glue_eval``, or ``None``). A stage holds ``n_cases``, ``score`` and, for every metric (``efficacy``,
    ``generalization``, ``specificity``, their ``*_magnitude``, ``fluency``, ``consistency``), either ``None`` or
    ``{"mean", "ci95", "low", "high", "std", "n"}`` in percent; ``efficacy_free``, ``generalization_free``,
    ``specificity_free`` (and, CounterFact, ``*_top1``) likewise, ``None`` for runs without them.
    Raises :class:`SummarizeError`.
    """
    if results_dir is None:
        from util.paths import get_paths

        results_dir = get_paths().results_dir
    alg_dir = Path(results_dir).expanduser() / dir_name
    return [summarize_run(run_dir) for run_dir in resolve_runs(alg_dir, runs)]


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _downstream_columns(rows: list[dict]) -> list[tuple[str, str]]:
    tasks: list[str] = []
    metrics: dict[str, list[str]] = {}
    for row in rows:
        for task, values in row["tasks"].items():
            if task not in tasks:
                tasks.append(task)
                metrics[task] = []
            for metric in values:
                if metric not in metrics[task]:
                    metrics[task].append(metric)
    order = {m: i for i, m in enumerate(DOWNSTREAM_METRIC_ORDER)}
    columns = []
    for task in tasks:
        for metric in sorted(metrics[task], key=lambda m: (order.get(m, len(order)), m)):
            columns.append((task, metric))
    return columns


def plot_downstream(run: dict) -> Path | None:
    """Write ``<run folder>/downstream.png`` (one panel per metric, one line per task, over ``edit_count``);
    ``None`` when the run has no downstream results."""
    rows = run.get("downstream")
    if not rows:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = _downstream_columns(rows)
    order = {m: i for i, m in enumerate(DOWNSTREAM_METRIC_ORDER)}
    metrics = sorted({m for _, m in columns}, key=lambda m: (order.get(m, len(order)), m))
    tasks = list(dict.fromkeys(t for t, _ in columns))
    fig = Figure(figsize=(4.8 * max(1, len(metrics)), 3.8))
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for task in tasks:
            points = [
                (row["edit_count"], row["tasks"][task][metric])
                for row in rows if metric in row["tasks"].get(task, {})
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=task)
        ax.set_title(metric)
        ax.set_xlabel("edits applied (edit_count)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    title = " ".join(str(x) for x in (run.get("alg_name"), run.get("model_name"), run["run"]) if x)
    fig.suptitle(f"Downstream tasks: {title}")
    fig.tight_layout()
    return save_png(fig, Path(run["path"]) / DOWNSTREAM_PLOT_NAME)


def plot_curves(runs: list[dict], overlay: Path | None = None) -> None:
    """``curves.png`` in each run folder with curve points, and the ``overlay`` of all of them (when given);
    the paths go into ``run["curves_plot"]`` and ``runs[0]["overlay_plot"]``. A run read from a digest file has
    no folder here: it is drawn in the overlay only."""
    from experiments.curves import plot_overlay, plot_run_curves

    drawn = []
    for run in runs:
        run["curves_plot"] = None
        points = run.get("curve_points")
        if points:
            series = run_series(points, run)
            if not run.get("digest"):
                run["curves_plot"] = str(plot_run_curves(series, Path(run["path"]) / CURVES_PLOT_NAME))
                logger.info("wrote %s", run["curves_plot"])
            drawn.append(series)
    if overlay is not None and runs:
        runs[0]["overlay_plot"] = str(plot_overlay(drawn, overlay)) if drawn else None


DIGEST_KEYS = ("run", "alg_name", "n_cases", "stages", "downstream", "curve_points")


def load_digest(path: Path) -> list[dict]:
    """The runs of a digest file: the output of ``summarize.py --json`` or ``--compare ... --json`` saved from
    another machine or session (a few kB per run: every number the table and the curves need)."""
    data = _load_json(path, "digest")
    runs = data if isinstance(data, list) else [data]
    for i, run in enumerate(runs):
        missing = [key for key in DIGEST_KEYS if not isinstance(run, dict) or key not in run]
        if missing:
            raise SummarizeError(
                f"{path} is not a digest of runs: entry {i} lacks {', '.join(missing)}. Write one with "
                f"'summarize.py --compare ALG/run_NNN --json > {path.name}' (or --dir_name ALG --json)")
        run["digest"] = str(path)
    return runs


def _with_last_checkpoint(run: dict) -> dict:
    """Add the perplexity (unedited, and after the last round) and the mean downstream accuracy of the last
    checkpoint, the columns of the comparison that come from the curve points and downstream files."""
    curve = run.get("curve_points") or []
    run["perplexity"] = curve[-1].get("perplexity_edited") if curve else None
    run["perplexity_unedited"] = curve[0].get("perplexity_unedited") if curve else None
    last = (run.get("downstream") or [None])[-1]
    accuracies = [v["accuracy"] for v in last["tasks"].values() if "accuracy" in v] if last else []
    run["downstream_last"] = ({"edit_count": last["edit_count"],
                               "mean_accuracy": 100.0 * sum(accuracies) / len(accuracies),
                               "tasks": {t: 100.0 * v["accuracy"] for t, v in last["tasks"].items()
                                         if "accuracy" in v}} if accuracies else None)
    return run


def compare(specs: Sequence[str], results_dir: Path) -> list[dict]:
    """Summaries of several methods' runs, in the order given, each with the perplexity and mean downstream
    accuracy of its last checkpoint. A spec is ``ALG/run_NNN`` (a folder of ``results_dir``) or the path of a
    digest file (``.json``, see :func:`load_digest`), so runs made on different machines can be compared."""
    runs = []
    for spec in specs:
        if spec.endswith(".json"):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise SummarizeError(f"digest file {path} not found: give ALG/run_NNN or the path of a file "
                                     "written by 'summarize.py ... --json'")
            runs.extend(_with_last_checkpoint(run) for run in load_digest(path))
            continue
        alg, sep, run_name = spec.strip("/").partition("/")
        if not sep or not run_name:
            raise SummarizeError(f"--compare takes ALG/run_NNN (e.g. ECE_WI/run_000) or a digest file (.json), "
                                 f"got {spec!r}")
        (run,) = summarize(alg, [run_name], results_dir)
        runs.append(_with_last_checkpoint(run))
    return runs


def render_comparison(runs: list[dict]) -> str:
    """AlphaEdit's Table 1 layout: one row per run and stage (post, final)."""
    headers = ["Method", "Run", "Edits", "Stage", "Efficacy", "Generalization", "Specificity", "Fluency",
               "Consistency*", "Eff. free", "Gen. free", "Spec. free", "Perplexity", "Downstream acc."]
    rows = []
    for run in runs:
        ppl = "-" if run.get("perplexity") is None else f"{run['perplexity']:.2f}"
        glue = run.get("downstream_last")
        glue_text = "-" if glue is None else f"{glue['mean_accuracy']:.1f} @{glue['edit_count']}"
        for stage_name in ("post", "final"):
            stage = run["stages"].get(stage_name)
            if stage is None:
                continue
            rows.append([run.get("alg_name") or "?", run["run"], str(run["n_cases"]), stage_name,
                         *(format_stat(stage.get(m)) for m in ("efficacy", "generalization", "specificity",
                                                               "fluency", "consistency", *FREE_METRICS)),
                         ppl if stage_name == "final" else "-", glue_text if stage_name == "final" else "-"])
    lines = format_table(headers, rows, left=4)
    unedited = [r["perplexity_unedited"] for r in runs if r.get("perplexity_unedited") is not None]
    # Runs of one model, seed and cases share the unedited texts: one value, named once with its runs.
    fluency_unedited: dict = {}  # formatted value -> names of the runs
    for r in runs:
        if (r["stages"].get("pre") or {}).get("fluency"):
            fluency_unedited.setdefault(format_stat(r["stages"]["pre"]["fluency"]), []).append(r.get("alg_name") or "?")
    if len(fluency_unedited) == 1:
        fluency_text = f"; fluency of the unedited model: {next(iter(fluency_unedited))}"
    else:
        fluency_text = "".join(f"; fluency of the unedited model (pre stage of {', '.join(names)}): {value}"
                               for value, names in fluency_unedited.items())
    lines += ["", "post: each record right after its own round; final: every record on the model after the last "
                  "round. Perplexity on held-out WikiText after the last round"
              + (f" (unedited model: {unedited[0]:.2f})" if unedited else "") + fluency_text
              + "; downstream: mean accuracy over the tasks at the last checkpoint (@ edits)."]
    fewer = [f"{run.get('alg_name') or '?'} {name} {stage['fluency']['n']}" for run in runs
             for name, stage in run["stages"].items()
             if name in ("post", "final") and stage.get("fluency") and stage["fluency"]["n"] < run["n_cases"]]
    if fewer:
        lines.append("Fluency and consistency over fewer cases than edited (every --generation_test_interval-th "
                     "case id): " + ", ".join(fewer) + ".")
    lines.append(f"* {consistency_header(runs)}.")
    prompt_sources = sorted(set(_stage_values(runs, "generation_prompts_source")))
    if prompt_sources:
        lines.append(f"Fluency and consistency texts from {'; '.join(prompt_sources)}.")
    if runs and runs[0].get("overlay_plot"):
        lines.append(f"Plot: {runs[0]['overlay_plot']}")
    lines += [f"Plot: {r['curves_plot']}" for r in runs if r.get("curves_plot")]
    return "\n".join(lines)


def save_png(fig, out: Path) -> Path:
    """Write ``fig`` to ``out`` atomically (a reader never sees half a PNG); :class:`SummarizeError` if it cannot."""
    from util.io import atomic_write_png

    try:
        atomic_write_png(fig, out, dpi=120)
    except OSError as exc:
        raise SummarizeError(f"cannot write {out}: {exc}") from None
    logger.info("wrote %s", out)
    return out


# ----------------------------------------------------------------------------------------------------
# Text output
# ----------------------------------------------------------------------------------------------------


def _pm() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "±".encode(encoding)
        return "±"
    except (UnicodeEncodeError, LookupError):
        return "+-"


def format_stat(stat: dict | None, digits: int = 1, missing: str = "-") -> str:
    if stat is None:
        return missing
    if stat.get("ci95") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} {_pm()} {stat['ci95']:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Aligned columns; the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value:.2g}"
    return f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _dataset_label(run: dict) -> str:
    return {COUNTERFACT: "CounterFact", ZSRE: "zsRE"}.get(run.get("dataset"), "no cases")


def _stage_values(runs: list[dict], key: str) -> list:
    return [stage.get(key) for run in runs for stage in run["stages"].values() if stage.get(key) is not None]


def consistency_header(runs: list[dict]) -> str:
    """The Consistency column named with its source (published or substitute), never bare."""
    sources = list(dict.fromkeys(_stage_values(runs, "consistency_source")))
    if not sources:
        return "Consistency (unavailable)"
    if len(sources) == 1 and sources[0] != MIXED:
        return f"Consistency ({sources[0]})"
    return "Consistency (sources differ: see the runs below)"


def _protocols_shown(runs: list[dict]) -> dict[str, dict]:
    shown: dict[str, dict] = {}
    for protocol in _stage_values(runs, "generation_protocol"):
        for p in protocol.get("protocols", [protocol]) if protocol["name"] == MIXED else [protocol]:
            shown.setdefault(protocol_identity(p), p)
    return shown


def render_text(runs: list[dict], results_path: Path | None = None) -> str:
    headers = ["Run", "Stage", "N cases", "Efficacy", "Generalization", "Specificity", "Score", *FREE_HEADERS,
               "Generation",
               "Fluency", consistency_header(runs), "Eff. magn.", "Gen. magn.", "Spec. magn.", "s/round"]
    rows = []
    for run in runs:
        if not run["stages"]:
            rows.append([run["run"], "-", "0", *["-"] * (len(headers) - 3)])
            continue
        for stage_name, stage in run["stages"].items():
            consistency_missing = {"unavailable": "n/a", MIXED: MIXED}.get(stage.get("consistency_status"), "-")
            fluency_missing = MIXED if stage.get("fluency_status") == MIXED else "-"
            protocol = stage.get("generation_protocol")
            rows.append([
                run["run"],
                stage_name,
                str(stage["n_cases"]),
                format_stat(stage["efficacy"]),
                format_stat(stage["generalization"]),
                format_stat(stage["specificity"]),
                "-" if stage["score"] is None else f"{stage['score']:.1f}",
                *(format_stat(stage.get(metric)) for metric in FREE_METRICS),
                "-" if protocol is None else protocol["name"],
                format_stat(stage["fluency"], missing=fluency_missing),
                format_stat(stage["consistency"], missing=consistency_missing),
                format_stat(stage["efficacy_magnitude"]),
                format_stat(stage["generalization_magnitude"]),
                format_stat(stage["specificity_magnitude"]),
                "-" if stage_name == "pre" else _seconds(run["time_per_round"]),
            ])
    lines = []
    if results_path is not None:
        lines += [f"Results: {results_path}", ""]
    lines += format_table(headers, rows, left=2)
    pm = _pm()
    lines += [
        "",
        f"Values: mean {pm} 95% interval (1.96*std/sqrt(n) over cases), in %. Score = harmonic mean of "
        "Efficacy, Generalization and Specificity.",
        "Free (Eff./Gen./Spec. free): share of prompts whose greedy answer (target tokens + 10 at most, cut at "
        "a line break) begins with the expected target as a whole word and does not name the competing one "
        "after it (docs/DESIGN.md section 7); '-': not evaluated.",
        "Magnitudes: mean probability difference (new - true; true - new for Specificity), in %. "
        "Fluency (n-gram entropy) and Consistency (tf-idf cosine) x100, as in the MEMIT tables.",
        "Stages: " + "; ".join(f"{STAGE_LABELS[s]}" for s in STAGES) + ".",
    ]
    protocols = _protocols_shown(runs)
    if protocols:
        lines.append("Generation (texts for Fluency and Consistency): "
                     + "; ".join(describe_protocol(p) for p in protocols.values()) + ".")
    if len(protocols) > 1:
        names = ", ".join(p["name"] for p in protocols.values())
        logger.warning("the table shows runs generated with different protocols (%s)", names)
        lines.append(f"WARNING: these rows were generated with different protocols ({names}); their Fluency and "
                     "Consistency are not comparable with each other.")
    lines.append("")
    for run in runs:
        mode = {True: "sequential", False: "non-sequential"}.get(run.get("sequential"), "sequential: ?")
        details = ", ".join(str(x) for x in (run.get("alg_name"), run.get("model_name")) if x) or "?"
        ds = run.get("ds_name") or "?"
        timing = "no edit time recorded"
        if run["time_total"] is not None:
            timing = (f"edit time {_seconds(run['time_per_round'])} s/round, "
                      f"{_seconds(run['time_total'])} s total")
            if run["n_timed_rounds"] < run["n_rounds"]:
                timing += f" ({run['n_timed_rounds']} timed rounds)"
        lines.append(
            f"{run['run']}: {details}; {ds} ({_dataset_label(run)}), {run.get('num_edits', '?')} edits/round, "
            f"{mode}; {run['n_cases']} cases in {run['n_rounds']} rounds, {timing}"
        )
        sources = list(dict.fromkeys(_stage_values([run], "consistency_source")))
        if sources:
            lines.append(f"  consistency source: {', '.join(sources)}")
        for stage_name, stage in run["stages"].items():
            for note in stage["notes"]:
                lines.append(f"  note ({stage_name}): {note}")
    for run in runs:
        if not run.get("downstream"):
            continue
        rows_ds = run["downstream"]
        columns = _downstream_columns(rows_ds)
        table_rows = []
        for row in rows_ds:
            cells = [str(row["edit_count"])]
            for task, metric in columns:
                value = row["tasks"].get(task, {}).get(metric)
                cells.append("-" if value is None else f"{value:.3f}")
            table_rows.append(cells)
        lines += ["", f"Downstream tasks of {run['run']} ({Path(run['path']) / 'glue_eval'}):"]
        lines += format_table(["edit_count", *(f"{t} {m}" for t, m in columns)], table_rows, left=0)
        if run.get("downstream_plot"):
            lines.append(f"Plot: {run['downstream_plot']}")
    for run in runs:
        if not run.get("curve"):
            continue
        number = lambda value, digits=1: "-" if value is None else f"{value:.{digits}f}"
        table_rows = [[str(row["edit_count"]), number(row["efficacy"]), number(row["generalization"]),
                       number(row["specificity"]), number(row["perplexity"], 2), number(row["max_spectral_ratio"], 3),
                       number(row["downstream_accuracy"])] for row in run["curve"]]
        lines += ["", f"Curves of {run['run']} (edits so far scored at each checkpoint; the last from the final "
                      f"stage where the run left it to that; {Path(run['path']) / 'curves'}):"]
        lines += format_table(["edits", "Efficacy", "Generalization", "Specificity", "Perplexity",
                               "max s(dW)/s(W)", "Downstream acc."], table_rows, left=0)
        if run.get("curves_plot"):
            lines.append(f"Plot: {run['curves_plot']}")
    return "\n".join(lines)


def to_json(runs: list[dict]) -> str:
    """JSON text of the summaries (no NaN: they are ``null``)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, np.generic):
            return clean(obj.item())
        return obj

    return json.dumps(clean(runs), indent=2, allow_nan=False)


# ----------------------------------------------------------------------------------------------------
# ECE explanations (--explain)
# ----------------------------------------------------------------------------------------------------


def explanation_files(run_dir: Path) -> list[Path]:
    """``explanation_round_NNN.json`` of a run folder in round order (written by ECE's rounds)."""
    files = [p for p in run_dir.iterdir() if _visible(p) and p.is_file() and EXPLANATION_RE.fullmatch(p.name)]
    return sorted(files, key=lambda p: int(EXPLANATION_RE.fullmatch(p.name).group(1)))


def load_explanation(path: Path) -> dict:
    """An explanation file, checked for what the view reads; :class:`SummarizeError` naming the path."""
    explanation = _load_json(path, "explanation file")
    try:
        if not isinstance(explanation, dict):
            raise ValueError(f"expected a JSON object, got {type(explanation).__name__}")
        for key, kind in (("layers", dict), ("clusters", list), ("requests", list)):
            if not isinstance(explanation.get(key), kind):
                raise ValueError(f"'{key}' must be a JSON {'object' if kind is dict else 'list'}")
        if not explanation["layers"]:
            raise ValueError("'layers' is empty")
        for layer, info in explanation["layers"].items():
            if not (isinstance(info, dict) and _whole(info.get("n_selected")) and _whole(info.get("n_neurons"))):
                raise ValueError(f"layer {layer} needs whole numbers 'n_selected' and 'n_neurons'")
        for index, cluster in enumerate(explanation["clusters"]):
            if not isinstance(cluster, dict) or "cluster" not in cluster:
                raise ValueError(f"cluster entry {index} has no 'cluster'")
            if not isinstance(cluster.get("relations") or {}, dict):
                raise ValueError(f"cluster {cluster['cluster']}: 'relations' must be an object of counts")
        clusters = {c["cluster"] for c in explanation["clusters"]}
        for index, request in enumerate(explanation["requests"]):
            if not isinstance(request, dict) or request.get("cluster") not in clusters:
                raise ValueError(f"request {index} names no cluster of 'clusters'")
            top = request.get("top_neurons")
            if not isinstance(top, dict) or not all(isinstance(v, list) and all(map(_whole, v)) for v in top.values()):
                raise ValueError(f"request {index}: 'top_neurons' must map each layer to a list of neuron indices")
    except ValueError as exc:
        raise SummarizeError(f"corrupt explanation file {path}: {exc}") from None
    return explanation


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cluster_top_neurons(members: Sequence[dict], layer: str, count: int = EXPLAIN_TOP_NEURONS) -> list[list[int]]:
    """``[[neuron, members listing it], ...]``: the neurons most often among the members' top neurons at
    ``layer``, ties broken by the better summed rank, so that identical lists keep their order."""
    listed: dict[int, list[int]] = {}
    for member in members:
        for rank, neuron in enumerate(member["top_neurons"].get(layer, [])):
            entry = listed.setdefault(neuron, [0, 0])
            entry[0] += 1
            entry[1] += rank
    order = sorted(listed, key=lambda n: (-listed[n][0], listed[n][1], n))
    return [[neuron, listed[neuron][0]] for neuron in order[:count]]


def explain_round(explanation: dict, path: Path) -> dict:
    """One round's explanation, aggregated for reading: per layer the selected count and mass share, per
    cluster its size, mean Jaccard, relations, loops and the top neurons its members share."""
    requests = explanation["requests"]
    layers = [{"layer": layer, "n_selected": info.get("n_selected"), "n_neurons": info.get("n_neurons"),
               "mass_share": info.get("mass_share")} for layer, info in explanation["layers"].items()]
    clusters = []
    for cluster in explanation["clusters"]:
        members = [r for r in requests if r["cluster"] == cluster["cluster"]]
        clusters.append({
            "cluster": cluster["cluster"], "size": cluster.get("size", len(members)),
            "mean_jaccard": cluster.get("mean_jaccard"), "loops": cluster.get("loops"),
            "relations": cluster.get("relations"), "case_ids": cluster.get("case_ids"),
            "top_neurons": {layer: cluster_top_neurons(members, layer) for layer in explanation["layers"]},
        })
    return {
        "file": str(path), "round": explanation.get("round"), "method": explanation.get("method"),
        # files written before cluster_by existed clustered by neurons
        "cluster_by": explanation.get("cluster_by", "neurons"), "z_mode": explanation.get("z_mode"),
        "n_requests": len(requests), "n_clusters": len(clusters), "n_loops": explanation.get("n_loops"),
        "layers": layers, "clusters": clusters, "plot": None,
    }


def explain_runs(dir_name: str, runs: str | Sequence[str] | None, results_dir: Path,
                 plot: bool = False) -> list[dict]:
    """``[{"run", "path", "rounds": [explain_round(...)]}]``; ``plot``: each round's PNG beside its file."""
    explained = []
    for run_dir in resolve_runs(Path(results_dir).expanduser() / dir_name, runs):
        files = explanation_files(run_dir)
        if not files:
            raise SummarizeError(f"no explanation_round_NNN.json in {run_dir}; ECE runs write one per round")
        rounds = []
        for path in files:
            explanation = load_explanation(path)
            summary = explain_round(explanation, path)
            if plot:
                summary["plot"] = str(plot_explanation(explanation, path.with_suffix(".png")))
            rounds.append(summary)
        explained.append({"run": run_dir.name, "path": str(run_dir), "rounds": rounds})
    return explained


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_explanations(explained: list[dict]) -> str:
    """The --explain view: per round the layers' selections, the clusters, and the top neurons they share."""
    lines = []
    for run in explained:
        for summary in run["rounds"]:
            lines += [f"{run['run']} round {summary['round']} ({summary['file']}): {summary['method']}, "
                      f"{summary['n_requests']} requests, {_count(summary['n_clusters'], 'cluster')} by "
                      f"{summary['cluster_by']}, {_count(summary['n_loops'], 'loop')}, z_mode {summary['z_mode']}", ""]
            lines += format_table(
                ["Layer", "Selected", "Neurons", "Selected share", "Mass share"],
                [[layer["layer"], str(layer["n_selected"]), str(layer["n_neurons"]),
                  _number(layer["n_selected"] / layer["n_neurons"], 3) if layer["n_neurons"] else "-",
                  _number(layer["mass_share"], 3)] for layer in summary["layers"]])
            lines.append("")
            lines += format_table(
                ["Cluster", "Size", "Mean Jaccard", "Loops", "Relations"],
                [[str(c["cluster"]), str(c["size"]), _number(c["mean_jaccard"], 3), str(c["loops"]),
                  ", ".join(f"{r}:{n}" for r, n in c["relations"].items()) if c["relations"] else "-"]
                 for c in summary["clusters"]], left=1)
            lines.append("")
            lines += format_table(
                ["Cluster", "Layer", "Top neurons (members listing them)"],
                [[str(c["cluster"]), layer, ", ".join(f"{n} ({k})" for n, k in top)]
                 for c in summary["clusters"] for layer, top in c["top_neurons"].items()], left=3)
            if summary["plot"]:
                lines.append(f"Plot: {summary['plot']}")
            lines.append("")
    return "\n".join(lines).rstrip()


def explanation_heatmap(explanation: dict) -> dict:
    """What the heatmap shows: ``case_ids`` of the rows (grouped by cluster, in request order within one),
    ``clusters`` and their ``sizes``, ``layer`` (the first edited), ``neurons`` (the columns: the most listed
    of the ``listed`` neurons among the requests' top neurons there), ``cells`` (1: the neuron is in the
    row's top neurons)."""
    layer = next(iter(explanation["layers"]))
    clusters = [c["cluster"] for c in explanation["clusters"]]
    rows = sorted(explanation["requests"], key=lambda r: clusters.index(r["cluster"]))  # stable within a cluster
    most_listed = [n for n, _ in cluster_top_neurons(rows, layer, count=EXPLAIN_PLOT_NEURONS)]
    # Columns by the first cluster whose members list them most, so that each cluster's block is together.
    neurons = sorted(most_listed, key=lambda n: _main_cluster(rows, clusters, layer, n))
    return {
        "case_ids": [r.get("case_id") for r in rows], "clusters": clusters,
        "sizes": [sum(1 for r in rows if r["cluster"] == c) for c in clusters], "layer": layer, "neurons": neurons,
        "listed": len({n for r in rows for n in r["top_neurons"].get(layer, [])}),
        "cells": np.array([[1.0 if n in r["top_neurons"].get(layer, []) else 0.0 for n in neurons] for r in rows]),
    }


def plot_explanation(explanation: dict, out: Path) -> Path:
    """Write the heatmap of :func:`explanation_heatmap`, cluster boundaries marked, and each layer's
    selected share of its neurons."""
    from matplotlib.figure import Figure

    heat = explanation_heatmap(explanation)
    neurons, sizes = heat["neurons"], heat["sizes"]
    fig = Figure(figsize=(min(16.0, 4.0 + 0.14 * len(neurons)), min(12.0, 3.0 + 0.12 * sum(sizes))))
    heat_ax, bar_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [4, 1]})
    heat_ax.imshow(heat["cells"], aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    edges = np.cumsum(sizes)
    for edge in edges[:-1]:
        heat_ax.axhline(edge - 0.5, color="tab:red", linewidth=1.2)
    heat_ax.set_yticks(edges - np.array(sizes) / 2 - 0.5)
    heat_ax.set_yticklabels([f"cluster {c} ({n})" for c, n in zip(heat["clusters"], sizes)], fontsize=8)
    heat_ax.set_xticks(range(len(neurons)))
    heat_ax.set_xticklabels([str(n) for n in neurons], rotation=90, fontsize=6)
    cut = f" ({len(neurons)} most listed of {heat['listed']})" if len(neurons) < heat["listed"] else ""
    heat_ax.set_xlabel(f"layer {heat['layer']} neurons among the requests' top neurons{cut}")
    heat_ax.set_ylabel("requests, grouped by cluster")

    names = list(explanation["layers"])
    info = explanation["layers"]
    shares = [info[l]["n_selected"] / info[l]["n_neurons"] if info[l].get("n_neurons") else 0.0 for l in names]
    bars = bar_ax.bar(range(len(names)), shares, color="tab:blue")
    for bar, l in zip(bars, names):
        bar_ax.annotate(f"{info[l].get('n_selected')}/{info[l].get('n_neurons')}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        rotation=90, fontsize=7)
    bar_ax.set_xticks(range(len(names)))
    bar_ax.set_xticklabels(names)
    bar_ax.set_ylim(0, 1.35)  # room for the counts above a full bar
    bar_ax.set_yticks(np.linspace(0, 1, 6))
    bar_ax.set_xlabel("layer")
    bar_ax.set_ylabel("selected / neurons")
    fig.suptitle(f"{explanation.get('method', '?')} round {explanation.get('round', '?')}: "
                 f"{_count(len(sizes), 'cluster')}"
                 f" (cluster_by {explanation.get('cluster_by', 'neurons')})")
    fig.tight_layout()
    return save_png(fig, out)


def _main_cluster(rows: Sequence[dict], clusters: list, layer: str, neuron: int) -> tuple:
    """(position of the cluster whose members list ``neuron`` most, minus that count): a column order."""
    counts = [sum(1 for r in rows if r["cluster"] == c and neuron in r["top_neurons"].get(layer, []))
              for c in clusters]
    best = int(np.argmax(counts))
    return best, -counts[best], neuron


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Summarise editing runs of results/<dir_name>/run_NNN into a table (and plots)."
    )
    parser.add_argument("--dir_name", default=None, help="algorithm folder under the results directory, e.g. MEMIT")
    parser.add_argument("--compare", nargs="+", default=None, metavar="ALG/run_NNN|DIGEST.json",
                        help="instead of --dir_name: runs of several methods side by side (AlphaEdit's Table 1: "
                             "post and final E/G/S, fluency, consistency, perplexity and downstream accuracy at the "
                             "last checkpoint); with --plot, compare_curves.png in the results directory. A run "
                             "made elsewhere is given as its digest, the --json output saved to a .json file")
    parser.add_argument("--runs", default=None,
                        help="comma-separated run folders (run_000,run_001 or 0,1); default: all run_NNN")
    parser.add_argument("--results_dir", default=None,
                        help="results directory (default: ECE_RESULTS_DIR or RESULTS_DIR in globals.yml)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    parser.add_argument("--plot", action="store_true",
                        help="write downstream.png (downstream metrics over edit_count) and, for sequential runs "
                             "with checkpoints, curves.png (experiments/curves.py) into each run folder; with "
                             "--explain, explanation_round_NNN.png beside each explanation file")
    parser.add_argument("--explain", action="store_true",
                        help="instead of the metrics: each ECE round's clusters, the top neurons their members "
                             "share, and the neurons selected per layer (explanation_round_NNN.json)")
    add_verbose_argument(parser)
    return parser


def run(argv: Sequence[str] | None = None) -> None:
    """Print the table (or JSON) of the runs asked for; :class:`SummarizeError` when they cannot be read."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.results_dir is None:
        from util.paths import get_paths

        results_dir = get_paths().results_dir
    else:
        results_dir = Path(args.results_dir).expanduser()
    if (args.dir_name is None) == (args.compare is None):
        raise SummarizeError("give either --dir_name (the runs of one method) or --compare ALG/run_NNN ...")
    if args.compare:
        runs = compare(args.compare, results_dir)
        if args.plot:
            plot_curves(runs, overlay=Path(results_dir) / COMPARE_PLOT_NAME)
        print(to_json(runs) if args.json else render_comparison(runs))
        return
    if args.explain:
        explained = explain_runs(args.dir_name, args.runs, results_dir, plot=args.plot)
        print(to_json(explained) if args.json else render_explanations(explained))
        return
    runs = summarize(args.dir_name, args.runs, results_dir)
    if args.plot:
        for run_summary in runs:
            path = plot_downstream(run_summary)
            run_summary["downstream_plot"] = None if path is None else str(path)
        plot_curves(runs)
    if args.json:
        print(to_json(runs))
    else:
        print(render_text(runs, Path(results_dir) / args.dir_name))


def main(argv: Sequence[str] | None = None) -> int:
    """The exit status: 0, or 2 with a one-line message for a results folder that cannot be summarised."""
    return run_script(run, argv)


if __name__ == "__main__":
    sys.exit(main())
