"""Per-case editing metrics and their aggregation over cases, shared by summarize.py and the benchmark.

Per case and evaluation stage (``pre``, ``post``, ``final``):

* CounterFact (``*_prompts_probs``: lists of ``{"target_new": NLL, "target_true": NLL}``): efficacy /
  generalization success = mean over rewrite / paraphrase prompts of ``[NLL_true > NLL_new]``, specificity
  success = mean over neighbourhood prompts of ``[NLL_true < NLL_new]`` (ties count as failures); the
  magnitudes are the mean probability differences (new - true; true - new for specificity). Fluency =
  ``ngram_entropy``, Consistency = ``reference_score``.
* zsRE (``*_prompts_correct``: per prompt a list of per-token booleans): accuracy = mean over prompts of the
  prompt's mean token correctness.
* Free generation, both datasets (``*_prompts_generated_correct``: one boolean per prompt, whether the greedy
  answer begins with the expected target, experiments/free_generation.py): ``efficacy_free``,
  ``generalization_free``, ``specificity_free`` = mean over the prompts of each kind; ``None`` for case files
  written before the metric existed. CounterFact also gets ``*_top1`` from ``*_prompts_correct`` (every target
  token top-1 under teacher forcing), the teacher-forced rule the free one is closest to.

Per stage over cases: the mean and the 95% interval ``mean +- 1.96 * std / sqrt(n)`` (sample std), in
percent; Score = harmonic mean of the three success means. Fluency and consistency are not averaged over
cases generated with different protocols or scored with different consistency sources.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

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
FREE_KEYS = {
    "efficacy_free": "rewrite_prompts_generated_correct",
    "generalization_free": "paraphrase_prompts_generated_correct",
    "specificity_free": "neighborhood_prompts_generated_correct",
}
TOP1_KEYS = {
    "efficacy_top1": "rewrite_prompts_correct",
    "generalization_top1": "paraphrase_prompts_correct",
    "specificity_top1": "neighborhood_prompts_correct",
}
SUCCESS_METRICS = ("efficacy", "generalization", "specificity")
FREE_METRICS = tuple(FREE_KEYS)
TOP1_METRICS = tuple(TOP1_KEYS)
MAGNITUDE_METRICS = ("efficacy_magnitude", "generalization_magnitude", "specificity_magnitude")
Z_95 = 1.96
PERCENT = 100.0
NOT_RECORDED = "not recorded"
MIXED = "mixed"


# ----------------------------------------------------------------------------------------------------
# Per-case metrics
# ----------------------------------------------------------------------------------------------------


def as_number(value: Any, what: str) -> float:
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
        new.append(as_number(entry["target_new"], f"{where}.target_new"))
        true.append(as_number(entry["target_true"], f"{where}.target_true"))
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
        out[metric] = None if value is None else as_number(value, f"'{stage_name}.{key}'")
    out.update(_boolean_rates(stage, TOP1_KEYS, stage_name, strict=False))
    out.update(_boolean_rates(stage, FREE_KEYS, stage_name))
    return out


def _boolean_rates(stage: dict, keys: dict[str, str], stage_name: str, strict: bool = True) -> dict[str, float | None]:
    """Mean of a list of per-prompt booleans for each metric; ``None`` when the key is absent or empty.
    Not ``strict`` (keys older files may have filled otherwise, e.g. per-token lists): ``None`` instead of
    an error for other values."""
    out: dict[str, float | None] = {}
    for metric, key in keys.items():
        entries = _entries(stage, key, stage_name) if strict else stage.get(key)
        values = []
        for i, value in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(value, bool):
                if not strict:
                    values = []
                    break
                raise ValueError(f"'{stage_name}.{key}[{i}]' must be a boolean, got {value!r}")
            values.append(float(value))
        out[metric] = float(np.mean(values)) if values else None
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
    out.update(_boolean_rates(stage, FREE_KEYS, stage_name))
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
    _summarize_free_generation(per_case, out, dataset)
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
        out["generation_protocol"] = out["consistency_source"] = out["generation_prompts_source"] = None
    return out


def _summarize_free_generation(per_case: list[dict], out: dict, dataset: str) -> None:
    """Free-generation (and, CounterFact, teacher-forced top-1) rates; a note when only some cases have them
    (runs evaluated before the metric existed have none: the columns show "-")."""
    metrics = FREE_METRICS + (TOP1_METRICS if dataset == COUNTERFACT else ())
    for metric in metrics:
        out[metric] = interval(c.get(metric) for c in per_case)
    protocols = list(dict.fromkeys(json.dumps(c["_free_generation"], sort_keys=True) for c in per_case
                                   if c.get("_free_generation") is not None))
    out["free_generation"] = json.loads(protocols[0]) if len(protocols) == 1 else None
    if len(protocols) > 1:
        for metric in FREE_METRICS:
            out[metric] = None
        out["free_generation"] = MIXED
        out["notes"].append("free-generation metrics not aggregated: the cases were decoded with different settings")
        return
    n_free = sum(c.get("efficacy_free") is not None or c.get("specificity_free") is not None for c in per_case)
    if 0 < n_free < len(per_case):
        out["notes"].append(f"free-generation metrics from {n_free} of {len(per_case)} cases (the rest were "
                            "evaluated without them)")


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


def protocol_identity(protocol: dict) -> str:
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
        identity = protocol_identity(protocol)
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
    prompt_sources = {case.get("_generation_prompts_source") for case in per_case if case["fluency"] is not None}
    prompt_sources.discard(None)
    out["generation_prompts_source"] = "; ".join(sorted(prompt_sources)) or None
    if prompt_sources:
        out["notes"].append(f"fluency and consistency texts from {out['generation_prompts_source']}")
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
