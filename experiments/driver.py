"""The driver's library: records and requests, hyperparameters with overrides, run folders and their resume
check, case files, the per-case evaluator, the sequential state on disk and the downstream schedule.

``experiments/evaluate.py`` is the script built on it; ``benchmark.py``, ``edit_drift.py`` and
``profile_targets.py`` use the same pieces.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from editing.requests import check_request
from editing.sequential import SequentialState
from experiments.algorithms import Algorithm
from util.errors import RunError
from util.hparams import HParamsError, HyperParams, parse_overrides, read_hparams_file
from util.io import atomic_torch_save, atomic_write_json
from util.paths import get_paths
from util.weights import snapshot_weights

LOG = logging.getLogger(__name__)

STAGE_LABELS = {
    "pre": "unedited model",
    "post": "model right after the round that edited the case",
    "final": "model after the last round (sequential runs only)",
}
# Settings a resumed run must share with the run it continues: a different seed changes the context
# templates half-way, newly enabled downstream checks would measure an "unedited" baseline on edited weights,
# and ``hparams`` holds the effective values (the file with the ``--hparams`` overrides applied).
RUN_KEYS = ("alg_name", "model_name", "ds_name", "dataset_size_limit", "num_edits", "sequential", "hparams",
            "generation_protocol", "seed", "downstream_eval_steps")
# What a run folder written before a setting existed ran with.
RUN_KEY_DEFAULTS = {"generation_protocol": "greedy"}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_hparams_path(algorithm: Algorithm, fname: str) -> Path:
    candidates = [get_paths().hparams_dir / algorithm.hparams_dir_name / fname, Path(fname)]
    for path in candidates:
        if path.is_file():
            return path
    folder = candidates[0].parent
    available = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
    raise HParamsError(
        f"hyperparameter file '{fname}' not found (looked in {folder} and as a path). "
        f"Available for {algorithm.name}: {available or 'none'}."
    )


def parse_algorithm_spec(spec: str) -> tuple:
    """``NAME:key=value:...`` -> (NAME, overrides), the benchmark's way to give one algorithm overrides."""
    name, *pairs = spec.split(":")
    return name, parse_overrides(pairs)


def load_hparams(algorithm: Algorithm, path: Path, overrides: Optional[dict] = None) -> HyperParams:
    """The hyperparameters of ``path`` with ``overrides`` applied, validated by the method's dataclass (a
    bad key or value raises :class:`HParamsError` naming it)."""
    return algorithm.hparams_class.from_json(path, overrides)


def effective_hparams_file(path: Path, overrides: Optional[dict]) -> dict:
    """The hyperparameter file's values with the overrides applied: what a run folder's hparams.json holds."""
    return {**read_hparams_file(path), **(overrides or {})}


# --ds_name choices and what each one reads.
DATASETS = {
    "mcf": "MultiCounterFact, MEMIT format (multi_counterfact.json)",
    "cf": "CounterFact, MEMIT format (counterfact.json)",
    "zsre": "zsRE, MEND/MEMIT or EasyEdit format (zsre_mem_eval.json or zsre_mend_eval.json)",
    "cf_easyedit": "CounterFact in EasyEdit's format: counterfact_easyedit/counterfact-train.json, then -val.json",
    "cf_easyedit_train": "counterfact_easyedit/counterfact-train.json only",
    "cf_easyedit_val": "counterfact_easyedit/counterfact-val.json only",
}
# The datasets scored with CounterFact's metrics (what the benchmark and the profiler edit).
COUNTERFACT_DATASETS = [name for name in DATASETS if name != "zsre"]


class Records(list):
    """The records of a run, in order, with what the loader left out: ``skipped`` is ``None`` or
    ``{"count", "by_kind"}`` (see ``dsets.skipped``), for params.json."""

    skipped: Optional[dict] = None


def load_records(ds_name: str, data_dir: Optional[str], limit: Optional[int]) -> Records:
    """The first ``limit`` usable records of a dataset (all when None).

    MEMIT-format CounterFact files must be valid throughout (a bad record raises); EasyEdit-format files and
    zsRE are read leniently, a record that cannot be used being reported and skipped. A ``limit`` above the
    number of usable records is a :class:`RunError`, never a silently shorter run.
    """
    from dsets import CF_EASYEDIT_DATASETS, CounterFactDataset, EasyEditCounterFactDataset, MENDQADataset

    if ds_name in ("mcf", "cf"):
        dataset = CounterFactDataset(data_dir, multi=ds_name == "mcf", size=limit)
        usable, sources, skipped = len(dataset), str(dataset.path), None
    elif ds_name == "zsre":
        dataset = MENDQADataset(data_dir, size=limit, skip_invalid=True)
        usable, sources, skipped = dataset.usable, str(dataset.path), dataset.skipped
    elif ds_name in CF_EASYEDIT_DATASETS:
        dataset = EasyEditCounterFactDataset(data_dir, ds_name, size=limit)
        usable, sources, skipped = dataset.usable, " + ".join(str(p) for p in dataset.paths), dataset.skipped
    else:
        raise RunError(f"unknown dataset '{ds_name}'; use one of {', '.join(DATASETS)}")
    if limit is not None and usable < limit:
        left_out = f", {len(skipped)} more skipped as unusable (see the warnings above)" if skipped else ""
        raise RunError(f"{limit} records asked for but {ds_name} has only {usable} usable records ({sources}"
                       f"{left_out}). Ask for at most {usable} (--dataset_size_limit {usable}) or use a larger "
                       "dataset.")
    records = Records(dataset)
    records.skipped = skipped.to_dict() if skipped is not None else None
    return records


def record_to_request(record: dict) -> dict:
    """The request of a dataset record: its ``requested_rewrite`` with the case id. A record that cannot be
    edited (no ``{}`` placeholder, no subject, an empty target) raises :class:`RequestError` naming its case."""
    return check_request(record, record.get("case_id"), label="case", from_dataset=True)


def case_path(run_dir: Path, num_edits: int, case_id) -> Path:
    return run_dir / f"{num_edits}_edits-case_{case_id}.json"


def explanation_path(run_dir: Path, round_index: int) -> Path:
    return run_dir / f"explanation_round_{round_index:03d}.json"


def new_run_dir(alg_dir: Path) -> Path:
    alg_dir.mkdir(parents=True, exist_ok=True)
    ids = [int(p.name.split("_")[-1]) for p in alg_dir.glob("run_*") if p.name.split("_")[-1].isdigit()]
    run_dir = alg_dir / f"run_{(max(ids) + 1 if ids else 0):03d}"
    run_dir.mkdir()
    return run_dir


def _difference(key: str, saved, now) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):  # name only the hyperparameters that differ
        keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        return "; ".join(f"{key}.{k}: run has {saved.get(k)!r}, now {now.get(k)!r}" for k in keys)
    return f"{key}: run has {saved!r}, now {now!r}"


def continue_run_dir(alg_dir: Path, run_name: str, run_params: dict, hparams_defaults: Optional[dict] = None) -> Path:
    """The run folder to resume; :class:`RunError` when it does not exist or ran with other settings.
    ``hparams_defaults``: a hyperparameter the run's params.json lacks (it was added to the code later) counts
    as its default, so adding a field never strands a run made before."""
    run_dir = alg_dir / run_name
    params_file = run_dir / "params.json"
    if not params_file.exists():
        existing = sorted(p.name for p in alg_dir.glob("run_*")) if alg_dir.exists() else []
        raise RunError(f"cannot continue: {params_file} does not exist. Runs of {alg_dir.name}: {existing or 'none'}")
    saved = json.loads(params_file.read_text())
    if hparams_defaults and isinstance(saved.get("hparams"), dict):
        saved["hparams"] = {**hparams_defaults, **saved["hparams"]}
    saved_value = lambda k: saved.get(k, RUN_KEY_DEFAULTS.get(k))
    differences = [k for k in RUN_KEYS if saved_value(k) != run_params.get(k)]
    if differences:
        detail = "; ".join(_difference(k, saved_value(k), run_params.get(k)) for k in differences)
        raise RunError(f"cannot continue {run_dir}: settings differ ({detail}). Start a new run instead.")
    LOG.info("continuing %s", run_dir)
    return run_dir


def start_run_dir(alg_dir: Path, run_params: dict, hparams_file: dict) -> Path:
    """A new ``run_NNN`` folder with params.json and hparams.json (the effective hyperparameters)."""
    run_dir = new_run_dir(alg_dir)
    atomic_write_json(run_dir / "params.json", run_params, indent=2)
    atomic_write_json(run_dir / "hparams.json", hparams_file, indent=2)
    LOG.info("results in %s", run_dir)
    return run_dir


class Evaluator:
    """Per-case metrics of one dataset, with the generation tests every ``interval`` cases.

    ``generation_protocol`` ("published": MEMIT's top-k 5 sampling of 100 tokens, seeded from ``seed`` and the
    case id; or "greedy") and the consistency source (published files or the labelled substitute) are
    recorded in every case's generation metrics. ``free_generation``: the free-generation metric of every
    case (experiments/free_generation.py), cheap next to the generation tests but about 3x the teacher-forced
    scoring alone. ``generation_stages``: the stages (``STAGE_LABELS``) whose evaluation has the generation
    tests; AlphaEdit's sequential protocol has them only after the last edit.
    """

    def __init__(self, ds_name: str, data_dir, skip_generation: bool, interval: int, batch_size: int,
                 generation_protocol: str = "published", seed: int = 0, free_generation: bool = True,
                 generation_stages: Sequence[str] = tuple(STAGE_LABELS)):
        from dsets import CF_EASYEDIT_DATASETS, ConsistencyResources
        from experiments.eval_counterfact import GenerationProtocol
        from experiments.free_generation import FreeGeneration

        self.ds_name, self.skip_generation, self.interval, self.batch_size = ds_name, skip_generation, interval, batch_size
        self.generation_stages = tuple(generation_stages)
        self.free_generation = FreeGeneration() if free_generation else None
        self.generation = GenerationProtocol(generation_protocol, seed=seed)
        self.consistency = ConsistencyResources(None, None, None)
        self._told_no_generation_prompts = False
        if not skip_generation and self.generation_stages:
            from dsets import consistency_resources, easyedit_consistency_resources

            if ds_name in ("mcf", "cf"):
                self.consistency = consistency_resources(data_dir)
            elif ds_name in CF_EASYEDIT_DATASETS:
                self.consistency = easyedit_consistency_resources(data_dir)

    def __call__(self, model, tok, record) -> dict:
        return self.many(model, tok, [record])[0]

    def many(self, model, tok, records: Sequence[dict], stage: Optional[str] = None,
             generation: bool = True) -> List[dict]:
        """The metrics of each record, all of them scored and decoded in shared batches; at a ``stage`` not in
        ``generation_stages``, or with ``generation`` false (``generation_only`` adds them later), without the
        generation tests."""
        with_generation = generation and (stage is None or stage in self.generation_stages)
        return self._evaluate(model, tok, records, [not (with_generation and self.generation_due(record))
                                                    for record in records], self.free_generation)

    def teacher_forced(self, model, tok, records: Sequence[dict]) -> List[dict]:
        """Only the teacher-forced metrics (no free generation, no generation tests): the cheap part, for
        scoring many records at a checkpoint."""
        return self._evaluate(model, tok, records, [True] * len(records), None)

    def generation_only(self, model, tok, records: Sequence[dict]) -> List[dict]:
        """Only the generation tests' metrics of each record (fluency, consistency), for records whose case
        was scored without them."""
        from experiments.eval_counterfact import generation_metrics_many

        return generation_metrics_many(model, tok, records, self.consistency.snippets, self.consistency.vectors,
                                       self.generation, self.consistency.source, self.consistency.unavailable_reason)

    def _evaluate(self, model, tok, records, skip_generation: List[bool], free_generation) -> List[dict]:
        if self.ds_name == "zsre":
            from experiments.eval_zsre import compute_rewrite_quality_zsre_many

            return compute_rewrite_quality_zsre_many(model, tok, records, self.batch_size, free_generation)
        from experiments.eval_counterfact import compute_rewrite_quality_counterfact_many

        return compute_rewrite_quality_counterfact_many(
            model, tok, records, self.consistency.snippets, self.consistency.vectors, skip_generation=skip_generation,
            generation_protocol=self.generation, consistency_source=self.consistency.source,
            consistency_unavailable=self.consistency.unavailable_reason, batch_size=self.batch_size,
            free_generation=free_generation,
        )

    def generation_due(self, record: dict) -> bool:
        """Whether the record gets the generation tests (at a stage that has them)."""
        due = not self.skip_generation and record["case_id"] % self.interval == 0
        if due and not record.get("generation_prompts"):
            due = False
            if not self._told_no_generation_prompts:
                self._told_no_generation_prompts = True
                LOG.warning("%s records have no generation_prompts: no fluency or consistency metrics for "
                            "them (their case files have no 'text', 'ngram_entropy' or 'reference_score')",
                            self.ds_name)
        return due


def save_sequential_state(path: Path, model, edited_modules: List[str], state: Optional[SequentialState],
                          rounds_done: int) -> None:
    """What a resumed sequential run restores: the edited weights, the method's state, the rounds done."""
    atomic_torch_save(path, {
        "weights": snapshot_weights(model, edited_modules),
        "state": state.state_dict() if state is not None else None,
        "rounds_done": rounds_done,
    })


def state_edits(rounds: Sequence[Sequence[int]], round_index: int) -> int:
    """Edits applied after rounds ``0..round_index`` of a sequential run."""
    return sum(len(r) for r in rounds[: round_index + 1])


class CheckpointSchedule:
    """Before the first round and after every ``steps`` rounds (0: never): the downstream checks and, for a
    sequential run, the curve point (experiments/curves.py). Each is skipped when its file exists, so a
    resumed run repeats neither."""

    def __init__(self, steps: int, run_dir: Path, n_examples: int, data_dir=None):
        self.steps, self.run_dir, self.n_examples, self.data_dir = steps, run_dir, n_examples, data_dir

    def due(self, rounds_done: int) -> bool:
        return self.steps > 0 and rounds_done % self.steps == 0

    def downstream(self, model, tok, rounds_done: int, edit_count: int) -> None:
        from experiments.downstream import downstream_result_path, evaluate_downstream, write_downstream_result

        if downstream_result_path(self.run_dir, edit_count).exists():
            return
        result = evaluate_downstream(model, tok, n_examples=self.n_examples, data_dir=self.data_dir)
        write_downstream_result(self.run_dir, edit_count, result, rounds_done)

    def curve(self, model, tok, rounds_done: int, edit_count: int, records_so_far: Sequence[dict], evaluator,
              original_weights: dict, generic_text) -> None:
        from experiments.curves import curve_point, curve_point_path, write_curve_point

        if curve_point_path(self.run_dir, edit_count).exists():
            return
        point = curve_point(model, tok, evaluator, records_so_far, original_weights, generic_text)
        write_curve_point(self.run_dir, edit_count, rounds_done, point)
