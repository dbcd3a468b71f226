"""Edit facts in a model and measure the result (MEMIT's driver conventions).

    python experiments/evaluate.py --alg_name MEMIT --model_name smollm2-135m \
        --hparams_fname smollm2-135m.json --ds_name mcf --dataset_size_limit 20 --num_edits 10

Rounds of ``--num_edits`` records are edited one after another. Sequential methods keep every round's
edit (``--sequential``); the others restore the weights after each round (MEMIT's protocol). Each
record gets one case file ``<num_edits>_edits-case_<id>.json`` with ``pre`` (unedited model), ``post``
(right after its round) and, for sequential runs, ``final`` (after the last round). Files are written
atomically; ``--continue_from_run run_NNN`` resumes an interrupted run without losing or duplicating
a case.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.algorithms import Algorithm, algorithm_names, get_algorithm  # noqa: E402
from editing.context import EditContext  # noqa: E402
from editing.sequential import SequentialState  # noqa: E402
from util.hparams import HParamsError  # noqa: E402
from util.io import atomic_torch_save, atomic_write_json  # noqa: E402
from util.models import ModelNotFoundError, load_model_and_tokenizer  # noqa: E402
from util.paths import get_paths  # noqa: E402
from util.weights import load_weights, snapshot_weights, temporarily_loaded  # noqa: E402

LOG = logging.getLogger("evaluate")

STAGE_LABELS = {
    "pre": "unedited model",
    "post": "model right after the round that edited the case",
    "final": "model after the last round (sequential runs only)",
}
# Settings a resumed run must share with the run it continues: a different seed changes the context
# templates half-way, newly enabled downstream checks would measure an "unedited" baseline on edited weights.
RUN_KEYS = ("alg_name", "model_name", "ds_name", "dataset_size_limit", "num_edits", "sequential", "hparams",
            "generation_protocol", "seed", "downstream_eval_steps")
# What a run folder written before a setting existed ran with.
RUN_KEY_DEFAULTS = {"generation_protocol": "greedy"}


class RunError(RuntimeError):
    """A run that cannot start or resume as asked; the message says why and what to do."""


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


def load_records(ds_name: str, data_dir: Optional[str], limit: Optional[int]):
    from dsets import CounterFactDataset, MENDQADataset

    if ds_name in ("mcf", "cf"):
        return list(CounterFactDataset(data_dir, multi=ds_name == "mcf", size=limit))
    if ds_name == "zsre":
        return list(MENDQADataset(data_dir, size=limit))
    raise RunError(f"unknown dataset '{ds_name}'; use mcf, cf or zsre")


def record_to_request(record: dict) -> dict:
    rewrite = record["requested_rewrite"]
    if rewrite["prompt"].count("{}") != 1:
        raise RunError(f"case {record['case_id']}: prompt {rewrite['prompt']!r} must contain '{{}}' for the subject once")
    return {"case_id": record["case_id"], **rewrite}


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


class Evaluator:
    """Per-case metrics of one dataset, with the generation tests every ``interval`` cases.

    ``generation_protocol`` ("published": MEMIT's top-k 5 sampling of 100 tokens, seeded from ``seed`` and the
    case id; or "greedy") and the consistency source (published files or the labelled substitute) are
    recorded in every case's generation metrics.
    """

    def __init__(self, ds_name: str, data_dir, skip_generation: bool, interval: int, batch_size: int,
                 generation_protocol: str = "published", seed: int = 0):
        from dsets import ConsistencyResources
        from experiments.eval_counterfact import GenerationProtocol

        self.ds_name, self.skip_generation, self.interval, self.batch_size = ds_name, skip_generation, interval, batch_size
        self.generation = GenerationProtocol(generation_protocol, seed=seed)
        self.consistency = ConsistencyResources(None, None, None)
        if ds_name in ("mcf", "cf") and not skip_generation:
            from dsets import consistency_resources

            self.consistency = consistency_resources(data_dir)

    def __call__(self, model, tok, record) -> dict:
        if self.ds_name == "zsre":
            from experiments.eval_zsre import compute_rewrite_quality_zsre

            return compute_rewrite_quality_zsre(model, tok, record)
        from experiments.eval_counterfact import compute_rewrite_quality_counterfact

        skip = self.skip_generation or (record["case_id"] % self.interval != 0)
        return compute_rewrite_quality_counterfact(
            model, tok, record, self.consistency.snippets, self.consistency.vectors, skip_generation=skip,
            generation_protocol=self.generation, consistency_source=self.consistency.source,
            consistency_unavailable=self.consistency.unavailable_reason, batch_size=self.batch_size,
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alg_name", required=True, help=f"one of {', '.join(algorithm_names())}")
    parser.add_argument("--model_name", required=True, help="embedded name (smollm2-135m), hub id or local dir")
    parser.add_argument("--hparams_fname", required=True, help="file in hparams/<ALG>/ or a path")
    parser.add_argument("--ds_name", choices=["mcf", "cf", "zsre"], default="mcf")
    parser.add_argument("--dataset_size_limit", type=int, default=None, help="edit the first N records")
    parser.add_argument("--num_edits", type=int, default=1, help="records edited together in one round")
    parser.add_argument("--continue_from_run", default=None, help="resume results/<ALG>/run_NNN")
    parser.add_argument("--skip_generation_tests", action="store_true", help="no fluency/consistency")
    parser.add_argument("--generation_test_interval", type=int, default=1, help="generation tests every N-th case id")
    parser.add_argument("--generation_protocol", choices=["published", "greedy"], default="published",
                        help="fluency/consistency texts: published = MEMIT's top-k 5 sampling, 100 tokens with the "
                             "prompt, seeded by --seed and the case id; greedy = argmax, 50 new tokens")
    parser.add_argument("--downstream_eval_steps", type=int, default=0,
                        help="downstream check before round 1 and after every N rounds (0 = off)")
    parser.add_argument("--downstream_examples", type=int, default=100, help="examples per downstream task")
    parser.add_argument("--conserve_memory", action="store_true", help="smaller evaluation batches")
    parser.add_argument("--use_cache", action="store_true",
                        help="accepted for MEMIT compatibility; statistics are always cached in STATS_DIR")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                        help="keep edits between rounds (default: on for sequential methods)")
    parser.add_argument("--skip_final_eval", action="store_true", help="sequential runs: no 'final' evaluation")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device_map", default=None, help="e.g. 'auto' to shard the model over GPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="folder with the data files (else ECE_DATA_DIR, globals.yml)")
    parser.add_argument("--results_dir", default=None, help="else ECE_RESULTS_DIR, globals.yml")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.num_edits < 1:
        parser.error("--num_edits must be >= 1")
    if args.generation_test_interval < 1:
        parser.error("--generation_test_interval must be >= 1")
    return args


def prepare_run_dir(args, algorithm: Algorithm, run_params: dict, hparams_path: Path) -> Path:
    alg_dir = Path(args.results_dir or get_paths().results_dir) / algorithm.name
    if args.continue_from_run:
        run_dir = alg_dir / args.continue_from_run
        params_file = run_dir / "params.json"
        if not params_file.exists():
            existing = sorted(p.name for p in alg_dir.glob("run_*")) if alg_dir.exists() else []
            raise RunError(f"cannot continue: {params_file} does not exist. Runs of {algorithm.name}: {existing or 'none'}")
        saved = json.loads(params_file.read_text())
        saved_value = lambda k: saved.get(k, RUN_KEY_DEFAULTS.get(k))
        differences = [k for k in RUN_KEYS if saved_value(k) != run_params.get(k)]
        if differences:
            detail = "; ".join(f"{k}: run has {saved_value(k)!r}, now {run_params.get(k)!r}" for k in differences)
            raise RunError(f"cannot continue {run_dir}: settings differ ({detail}). Start a new run instead.")
        LOG.info("continuing %s", run_dir)
        return run_dir
    run_dir = new_run_dir(alg_dir)
    atomic_write_json(run_dir / "params.json", run_params, indent=2)
    shutil.copyfile(hparams_path, run_dir / "hparams.json")
    LOG.info("results in %s", run_dir)
    return run_dir


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    algorithm = get_algorithm(args.alg_name)
    hparams_path = resolve_hparams_path(algorithm, args.hparams_fname)
    hparams = algorithm.hparams_class.from_json(hparams_path)
    sequential = algorithm.sequential_by_default if args.sequential is None else args.sequential
    records = load_records(args.ds_name, args.data_dir, args.dataset_size_limit)
    if not records:
        raise RunError("the dataset selection is empty")
    requests = [record_to_request(r) for r in records]
    if args.downstream_eval_steps > 0 and not sequential:
        raise RunError("--downstream_eval_steps measures the model as edits accumulate; it needs a sequential "
                       "run (add --sequential, or set --downstream_eval_steps 0)")

    run_params = {
        "alg_name": algorithm.name, "model_name": args.model_name, "hparams_fname": str(hparams_path),
        "ds_name": args.ds_name, "dataset_size_limit": args.dataset_size_limit, "num_edits": args.num_edits,
        "sequential": sequential, "seed": args.seed, "generation_protocol": args.generation_protocol,
        "device": args.device, "dtype": args.dtype,
        "device_map": args.device_map, "hparams": hparams.to_dict(), "evaluation_stages": STAGE_LABELS,
        "downstream_eval_steps": args.downstream_eval_steps, "argv": sys.argv if argv is None else list(argv),
        "torch_version": torch.__version__,
    }
    run_dir = prepare_run_dir(args, algorithm, run_params, hparams_path)

    model, tok = load_model_and_tokenizer(args.model_name, args.device, args.dtype, args.device_map)
    context = EditContext(args.model_name, data_dir=args.data_dir, seed=args.seed)
    edited_modules = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    original_weights = snapshot_weights(model, edited_modules)
    evaluate_case = Evaluator(args.ds_name, args.data_dir, args.skip_generation_tests,
                              args.generation_test_interval, batch_size=8 if args.conserve_memory else 32,
                              generation_protocol=args.generation_protocol, seed=args.seed)

    state_file = run_dir / "sequential_state.pt"
    state: Optional[SequentialState] = None
    if sequential and algorithm.uses_sequential_state:
        state = SequentialState(track_prev_moments=algorithm.keeps_prev_moments)
    rounds_done = 0
    if sequential and state_file.exists():
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        load_weights(model, saved["weights"])
        rounds_done = saved["rounds_done"]
        if state is not None:
            state = SequentialState.from_state_dict(saved["state"])
        LOG.info("restored the edited weights after %d rounds from %s", rounds_done, state_file)

    rounds = [list(range(i, min(i + args.num_edits, len(records)))) for i in range(0, len(records), args.num_edits)]
    downstream = DownstreamSchedule(args, run_dir)
    downstream.maybe_run(model, tok, rounds_done=0, edit_count=0)
    for round_index, members in enumerate(tqdm(rounds, desc=f"{algorithm.name} rounds", unit="round")):
        paths = [case_path(run_dir, args.num_edits, records[i]["case_id"]) for i in members]
        if (sequential and round_index < rounds_done) or (not sequential and all(p.exists() for p in paths)):
            continue
        round_requests = [requests[i] for i in members]
        with temporarily_loaded(model, original_weights):
            pre = [evaluate_case(model, tok, records[i]) for i in members]
        set_seed(args.seed + round_index)
        start = time.perf_counter()
        report = algorithm.apply(model, tok, round_requests, hparams, context, state)
        edit_seconds = time.perf_counter() - start
        LOG.info("round %d: %d edits in %.1fs %s", round_index, len(members), edit_seconds, report.seconds)
        if report.explanation is not None:
            atomic_write_json(explanation_path(run_dir, round_index), {"round": round_index, **report.explanation})
        post = [evaluate_case(model, tok, records[i]) for i in members]
        for i, path, pre_metrics, post_metrics in zip(members, paths, pre, post):
            atomic_write_json(path, {
                "case_id": records[i]["case_id"],
                "grouped_case_ids": [records[j]["case_id"] for j in members],
                "num_edits": args.num_edits,
                "requested_rewrite": records[i]["requested_rewrite"],
                "time": edit_seconds,
                "round": round_index,
                "edit_report": report.to_dict(),
                "pre": pre_metrics,
                "post": post_metrics,
            })
        if sequential:
            downstream.maybe_run(model, tok, rounds_done=round_index + 1, edit_count=state_edits(rounds, round_index))
            save_sequential_state(state_file, model, edited_modules, state, rounds_done=round_index + 1)
        else:
            load_weights(model, original_weights)

    if sequential and algorithm.finish is not None and state is not None and not state.finished:
        finished = algorithm.finish(model, hparams, state)
        state.finished = True
        LOG.info("%s after the last round: %s", algorithm.name, finished)
        save_sequential_state(state_file, model, edited_modules, state, rounds_done=len(rounds))
    if sequential and not args.skip_final_eval:
        for record in tqdm(records, desc="final evaluation", unit="case"):
            path = case_path(run_dir, args.num_edits, record["case_id"])
            case = json.loads(path.read_text())
            if "final" not in case:
                case["final"] = evaluate_case(model, tok, record)
                atomic_write_json(path, case)
    LOG.info("done: %s", run_dir)
    return run_dir


def save_sequential_state(path: Path, model, edited_modules: List[str], state: Optional[SequentialState],
                          rounds_done: int) -> None:
    """What a resumed sequential run restores: the edited weights, the method's state, the rounds done."""
    atomic_torch_save(path, {
        "weights": snapshot_weights(model, edited_modules),
        "state": state.state_dict() if state is not None else None,
        "rounds_done": rounds_done,
    })


def state_edits(rounds: List[List[int]], round_index: int) -> int:
    """Edits applied after rounds ``0..round_index`` of a sequential run."""
    return sum(len(r) for r in rounds[: round_index + 1])


class DownstreamSchedule:
    """Downstream checks before the first round and after every ``--downstream_eval_steps`` rounds."""

    def __init__(self, args, run_dir: Path):
        self.steps, self.run_dir, self.args = args.downstream_eval_steps, run_dir, args

    def maybe_run(self, model, tok, rounds_done: int, edit_count: int) -> None:
        if self.steps <= 0 or rounds_done % self.steps != 0:
            return
        from experiments.downstream import downstream_result_path, evaluate_downstream, write_downstream_result

        if downstream_result_path(self.run_dir, edit_count).exists():
            return
        result = evaluate_downstream(model, tok, n_examples=self.args.downstream_examples, data_dir=self.args.data_dir)
        write_downstream_result(self.run_dir, edit_count, result, rounds_done)


def run_script(main: Callable, argv=None, on_interrupt: Optional[str] = None) -> int:
    """Run a script's ``main(argv)``: bad input ends with its message and exit status 2, not a traceback."""
    try:
        main(argv)
    except (RunError, HParamsError, ModelNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        print(on_interrupt, file=sys.stderr)
        return 130
    return 0


def cli(argv=None) -> int:
    return run_script(main, argv, "interrupted: every finished case file is on disk; resume with --continue_from_run")


if __name__ == "__main__":
    sys.exit(cli())
