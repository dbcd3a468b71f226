"""Summarise editing runs: one table row per run and evaluation stage, downstream curves, JSON output.

Usage::

    python summarize.py --dir_name=MEMIT --runs=run_000,run_001 [--json] [--plot] [--results_dir PATH]

Without ``--runs`` every ``run_NNN`` folder under ``<results_dir>/<dir_name>/`` is summarised.

What is computed (DESIGN.md section 7), separately for each evaluation stage of a case file:
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
* Per run and stage: the mean over cases and the 95% interval ``mean +- 1.96 * std / sqrt(n)`` (``std`` is
  the sample standard deviation, ``ddof=1``; no interval for a single case), all in percent. Fluency and
  Consistency are multiplied by 100 too, the scale of the MEMIT / AlphaEdit / ECE tables (fluency ~ 620).
  Score = harmonic mean of the efficacy, generalization and specificity success means.
* Edit time: one ``time`` per round (cases grouped by ``grouped_case_ids``): mean per round and total.
* ``run_NNN/glue_eval/*.json`` (downstream checks): each task's metrics over ``edit_count``; ``--plot`` writes
  ``run_NNN/downstream.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

logger = logging.getLogger("summarize")

STAGES = ("pre", "post", "final")
STAGE_LABELS = {
    "pre": "pre (unedited model)",
    "post": "post (right after each case's round)",
    "final": "final (model after the last round)",
}
RUN_RE = re.compile(r"run_(\d+)")
CASE_RE = re.compile(r"(\d+)_edits-case_(.+)\.json")

COUNTERFACT = "counterfact"
ZSRE = "zsre"
CF_KEYS = {
    "efficacy": "rewrite_prompts_probs",
    "generalization": "paraphrase_prompts_probs",
    "specificity": "neighborhood_prompts_probs",
}
ZSRE_KEYS = {
    "efficacy": "rewrite_prompts_correct",
    "generalization": "paraphrase_prompts_correct",
    "specificity": "neighborhood_prompts_correct",
}
SUCCESS_METRICS = ("efficacy", "generalization", "specificity")
MAGNITUDE_METRICS = ("efficacy_magnitude", "generalization_magnitude", "specificity_magnitude")
Z_95 = 1.96
PERCENT = 100.0
DOWNSTREAM_METRIC_ORDER = ("accuracy", "f1", "mcc")
DOWNSTREAM_PLOT_NAME = "downstream.png"
NOT_RECORDED = "not recorded"
MIXED = "mixed"


class SummarizeError(Exception):
    """A results folder, run or file that cannot be summarised; the message names the path."""


# ----------------------------------------------------------------------------------------------------
# Per-case metrics
# ----------------------------------------------------------------------------------------------------


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _entries(stage: dict, key: str, stage_name: str) -> list | None:
    if key not in stage or stage[key] is None:
        return None
    entries = stage[key]
    if not isinstance(entries, list):
        raise ValueError(f"'{stage_name}.{key}' must be a list, got {type(entries).__name__}")
    return entries


def _cf_nlls(entries: list, key: str, stage_name: str) -> tuple[np.ndarray, np.ndarray]:
    new, true = [], []
    for i, entry in enumerate(entries):
        where = f"'{stage_name}.{key}[{i}]'"
        if not isinstance(entry, dict) or "target_new" not in entry or "target_true" not in entry:
            raise ValueError(f"{where} must be a dict with 'target_new' and 'target_true' NLLs, got {entry!r}")
        new.append(_number(entry["target_new"], f"{where}.target_new"))
        true.append(_number(entry["target_true"], f"{where}.target_true"))
    return np.asarray(new, dtype=float), np.asarray(true, dtype=float)


def counterfact_case_metrics(stage: dict, stage_name: str = "post") -> dict[str, float | None]:
    """Success rates and magnitudes (fractions, not percent) of one case at one stage; ``None`` where the
    case has no prompts of that kind."""
    out: dict[str, float | None] = {}
    for metric, key in CF_KEYS.items():
        entries = _entries(stage, key, stage_name)
        if not entries:
            out[metric] = out[f"{metric}_magnitude"] = None
            continue
        nll_new, nll_true = _cf_nlls(entries, key, stage_name)
        p_new, p_true = np.exp(-nll_new), np.exp(-nll_true)
        if metric == "specificity":
            out[metric] = float(np.mean(nll_true < nll_new))
            out[f"{metric}_magnitude"] = float(np.mean(p_true - p_new))
        else:
            out[metric] = float(np.mean(nll_true > nll_new))
            out[f"{metric}_magnitude"] = float(np.mean(p_new - p_true))
    for metric, key in (("fluency", "ngram_entropy"), ("consistency", "reference_score")):
        value = stage.get(key)
        out[metric] = None if value is None else _number(value, f"'{stage_name}.{key}'")
    return out


def _token_accuracy(tokens: Any, where: str) -> float | None:
    if isinstance(tokens, (bool, int, float)):
        tokens = [tokens]
    if not isinstance(tokens, list):
        raise ValueError(f"{where} must be a list of per-token booleans, got {tokens!r}")
    if not tokens:
        return None
    values = []
    for t in tokens:
        if not isinstance(t, (bool, int, float)):
            raise ValueError(f"{where} must hold booleans, got {t!r}")
        values.append(float(t))
    return float(np.mean(values))


def zsre_case_metrics(stage: dict, stage_name: str = "post") -> dict[str, float | None]:
    """Token accuracies (fractions) of one case at one stage: mean over prompts of the per-prompt mean."""
    out: dict[str, float | None] = {}
    for metric, key in ZSRE_KEYS.items():
        entries = _entries(stage, key, stage_name)
        per_prompt = []
        for i, tokens in enumerate(entries or []):
            acc = _token_accuracy(tokens, f"'{stage_name}.{key}[{i}]'")
            if acc is not None:
                per_prompt.append(acc)
        out[metric] = float(np.mean(per_prompt)) if per_prompt else None
    return out


def detect_dataset(stage: dict) -> str | None:
    """``counterfact`` when the stage holds ``*_prompts_probs`` (checked first: MEMIT's CounterFact results
    also carry ``*_correct`` lists), ``zsre`` when it holds ``*_prompts_correct``, else ``None``."""
    if any(key in stage for key in CF_KEYS.values()):
        return COUNTERFACT
    if any(key in stage for key in ZSRE_KEYS.values()):
        return ZSRE
    return None


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------


def interval(values: Iterable[float | None], scale: float = PERCENT) -> dict | None:
    """Mean and 95% interval (``1.96 * std / sqrt(n)``, sample std) of the non-``None`` values, scaled."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    arr = np.asarray(vals, dtype=float) * scale
    n = len(arr)
    mean = float(arr.mean())
    std = half = low = high = None
    if n > 1:
        std = float(arr.std(ddof=1))
        half = Z_95 * std / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"mean": mean, "ci95": half, "low": low, "high": high, "std": std, "n": n}


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarize_stage(per_case: list[dict], dataset: str, stage_name: str) -> dict:
    """Aggregate the per-case metrics of one stage."""
    out: dict[str, Any] = {"stage": stage_name, "n_cases": len(per_case), "notes": []}
    for metric in SUCCESS_METRICS:
        out[metric] = interval(c[metric] for c in per_case)
    means = [out[m]["mean"] for m in SUCCESS_METRICS if out[m] is not None]
    out["score"] = harmonic_mean(means) if len(means) == len(SUCCESS_METRICS) else None
    missing = [m for m in SUCCESS_METRICS if out[m] is None]
    if missing:
        out["notes"].append(f"no prompts for {', '.join(missing)}; Score not computed")
    if dataset == COUNTERFACT:
        for metric in MAGNITUDE_METRICS:
            out[metric] = interval(c[metric] for c in per_case)
        _check_generation_sources(per_case, out)
        for metric, key in (("fluency", "ngram_entropy"), ("consistency", "reference_score")):
            if out.get(f"{metric}_status") == MIXED:
                out[metric] = None
                continue
            out[metric] = interval(c[metric] for c in per_case)
            n_present = sum(c[metric] is not None for c in per_case)
            if out[metric] is None:
                had_key = any(c.get(f"_{metric}_key") for c in per_case)
                status = "unavailable" if metric == "consistency" and had_key else "absent"
            else:
                status = "ok"
                if n_present < len(per_case):
                    out["notes"].append(
                        f"{metric} from {n_present} of {len(per_case)} cases ({key} missing or null in the rest)"
                    )
            out[f"{metric}_status"] = status
        if out["consistency_status"] == "unavailable":
            out["notes"].append(
                f"consistency unavailable: reference_score is null in all {len(per_case)} cases "
                "(neither published nor substitute references and tf-idf statistics when the run was evaluated)"
            )
    else:
        for metric in MAGNITUDE_METRICS + ("fluency", "consistency"):
            out[metric] = None
        out["fluency_status"] = out["consistency_status"] = "absent"
        out["generation_protocol"] = out["consistency_source"] = None
    return out


def generation_protocol_of(stage: dict, stage_name: str = "post") -> dict | None:
    """The protocol that generated a stage's texts (``{"name": "not recorded"}`` for generation metrics
    written before protocols were stored), or ``None`` when the stage has no generation metrics."""
    if "ngram_entropy" not in stage and "text" not in stage:
        return None
    protocol = stage.get("generation_protocol")
    if protocol is None:
        return {"name": NOT_RECORDED}
    if not isinstance(protocol, dict) or not isinstance(protocol.get("name"), str):
        raise ValueError(f"'{stage_name}.generation_protocol' must be an object with a 'name', got {protocol!r}")
    return protocol


def _protocol_identity(protocol: dict) -> str:
    """What makes two protocols comparable: every parameter except the seed."""
    return json.dumps({k: v for k, v in protocol.items() if k != "seed"}, sort_keys=True)


def describe_protocol(protocol: dict | None) -> str:
    if protocol is None:
        return "-"
    name = protocol["name"]
    if name == "published":
        seed = protocol.get("seed")
        seeds = ", ".join(map(str, seed)) if isinstance(seed, list) else seed
        return (f"published: top-k {protocol.get('top_k')} sampling, {protocol.get('max_out_len')} tokens "
                f"including the prompt, seed {seeds} (MEMIT generate_fast)")
    if name == "greedy":
        return f"greedy: argmax decoding, {protocol.get('max_new_tokens')} new tokens"
    if name == NOT_RECORDED:
        return "not recorded: the case files do not say how their texts were generated"
    return name


def _check_generation_sources(per_case: list[dict], out: dict) -> None:
    """Set the stage's ``generation_protocol`` and ``consistency_source``; mark fluency and consistency
    ``mixed`` (not aggregated) when its cases used different protocols or consistency sources."""
    protocols: dict[str, dict] = {}
    counts: dict[str, int] = {}
    seeds: list = []
    for case in per_case:
        protocol = case.get("_generation_protocol")
        if protocol is None:
            continue
        identity = _protocol_identity(protocol)
        protocols.setdefault(identity, protocol)
        counts[identity] = counts.get(identity, 0) + 1
        if "seed" in protocol and protocol["seed"] not in seeds:
            seeds.append(protocol["seed"])
    out["generation_protocol"] = None
    if len(protocols) == 1:
        out["generation_protocol"] = dict(next(iter(protocols.values())))
        if len(seeds) > 1:
            out["generation_protocol"]["seed"] = seeds
    elif len(protocols) > 1:
        found = "; ".join(f"{counts[k]} cases {describe_protocol(p)}" for k, p in protocols.items())
        out["generation_protocol"] = {"name": MIXED, "protocols": list(protocols.values())}
        out["fluency_status"] = out["consistency_status"] = MIXED
        message = f"fluency and consistency not aggregated: the cases mix generation protocols ({found})"
        out["notes"].append(message)
        logger.warning("stage %s: %s", out["stage"], message)
    sources: dict[str, int] = {}
    for case in per_case:
        if case["consistency"] is not None:
            source = case.get("_consistency_source") or NOT_RECORDED
            sources[source] = sources.get(source, 0) + 1
    out["consistency_source"] = next(iter(sources)) if len(sources) == 1 else None
    if len(sources) > 1:
        out["consistency_source"] = MIXED
        if out.get("consistency_status") != MIXED:
            out["consistency_status"] = MIXED
            found = "; ".join(f"{n} cases {source}" for source, n in sources.items())
            message = f"consistency not aggregated: the cases mix references / tf-idf statistics ({found})"
            out["notes"].append(message)
            logger.warning("stage %s: %s", out["stage"], message)


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
            else:
                m = zsre_case_metrics(stage, stage_name)
            metrics[stage_name] = m
        if record.get("time") is not None:
            _number(record["time"], "'time'")
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
            edit_count = _number(data["edit_count"], "'edit_count'")
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
    return {
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
    ``{"mean", "ci95", "low", "high", "std", "n"}`` in percent. Raises :class:`SummarizeError`.
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from util.io import atomic_write

    columns = _downstream_columns(rows)
    order = {m: i for i, m in enumerate(DOWNSTREAM_METRIC_ORDER)}
    metrics = sorted({m for _, m in columns}, key=lambda m: (order.get(m, len(order)), m))
    tasks = list(dict.fromkeys(t for t, _ in columns))
    fig = Figure(figsize=(4.8 * max(1, len(metrics)), 3.8))
    FigureCanvasAgg(fig)
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
    out = Path(run["path"]) / DOWNSTREAM_PLOT_NAME
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
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
            shown.setdefault(_protocol_identity(p), p)
    return shown


def render_text(runs: list[dict], results_path: Path | None = None) -> str:
    headers = ["Run", "Stage", "N cases", "Efficacy", "Generalization", "Specificity", "Score", "Generation",
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
# CLI
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Summarise editing runs of results/<dir_name>/run_NNN into a table (and plots)."
    )
    parser.add_argument("--dir_name", required=True, help="algorithm folder under the results directory, e.g. MEMIT")
    parser.add_argument("--runs", default=None,
                        help="comma-separated run folders (run_000,run_001 or 0,1); default: all run_NNN")
    parser.add_argument("--results_dir", default=None,
                        help="results directory (default: ECE_RESULTS_DIR or RESULTS_DIR in globals.yml)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    parser.add_argument("--plot", action="store_true",
                        help="write downstream.png (downstream metrics over edit_count) into each run folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.results_dir is None:
            from util.paths import get_paths

            results_dir = get_paths().results_dir
        else:
            results_dir = Path(args.results_dir).expanduser()
        runs = summarize(args.dir_name, args.runs, results_dir)
        if args.plot:
            for run in runs:
                path = plot_downstream(run)
                run["downstream_plot"] = None if path is None else str(path)
    except SummarizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(to_json(runs))
    else:
        print(render_text(runs, Path(results_dir) / args.dir_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
