"""Edit facts in a model and measure the result (MEMIT's driver conventions).

    python experiments/evaluate.py --alg_name MEMIT --model_name smollm2-135m \
        --hparams_fname smollm2-135m.json --ds_name mcf --dataset_size_limit 20 --num_edits 10

Rounds of ``--num_edits`` records are edited one after another. Sequential methods keep every round's
edit (``--sequential``); the others restore the weights after each round (MEMIT's protocol). Each
record gets one case file ``<num_edits>_edits-case_<id>.json`` with ``pre`` (unedited model), ``post``
(right after its round) and, for sequential runs, ``final`` (after the last round). Files are written
atomically; ``--continue_from_run run_NNN`` resumes an interrupted run without losing or duplicating
a case. ``--hparams key=value ...`` overrides values of the hyperparameter file (JSON values); the run
folder's params.json and hparams.json record the effective values. A round's records are scored together
(``Evaluator.many``). With ``--downstream_eval_steps N`` a sequential run checks the downstream tasks and writes
a curve point (experiments/curves.py) before the first round and after every N rounds.

The script is argument parsing and the loop over rounds; its pieces live in ``experiments/driver.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing.context import EditContext  # noqa: E402
from editing.sequential import SequentialState  # noqa: E402
from experiments.algorithms import algorithm_names, get_algorithm  # noqa: E402
from experiments.driver import (CheckpointSchedule, DATASETS, STAGE_LABELS, Evaluator, RunError,  # noqa: E402,F401
                                case_path, continue_run_dir, effective_hparams_file, explanation_path,
                                load_hparams, load_records, record_to_request,
                                resolve_hparams_path, save_sequential_state, set_seed, start_run_dir, state_edits)
from experiments.curves import GenericText, statistics_chunks  # noqa: E402
from experiments.free_generation import FreeGeneration  # noqa: E402
from experiments.progress import RunClock  # noqa: E402
from util.cli import run_script, script_parser, setup_logging  # noqa: E402
from util.hparams import parse_overrides  # noqa: E402
from util.io import atomic_write_json  # noqa: E402
from util.models import load_model_and_tokenizer  # noqa: E402
from util.tokens import chunks  # noqa: E402
from util.paths import get_paths  # noqa: E402
from util.weights import load_weights, snapshot_weights, temporarily_loaded  # noqa: E402

LOG = logging.getLogger("evaluate")
FINAL_EVALUATION_GROUP = 100  # records scored together in the final evaluation; each group is saved as it ends
GENERATION_GROUP = 128  # cases whose generation texts are sampled together (two prompts each on cf_easyedit)

# MEMIT's switches that have no meaning here: the message says why and what to use instead.
REMOVED_SWITCHES = {
    "use_cache": "--use_cache is not supported: MEMIT's per-case cache of keys and target values under KV_DIR is "
                 "not implemented, every round computes them (the second-moment statistics are always cached in "
                 "STATS_DIR). Drop the flag.",
    "conserve_memory": "--conserve_memory is not needed: MEMIT's flag keeps the backup of the unedited weights on "
                       "the CPU, and this driver always does. Drop the flag (for smaller evaluation batches use "
                       "--eval_batch_size).",
}


def stage_list(text: str) -> tuple:
    """``--generation_stages``: a comma-separated subset of the evaluation stages."""
    stages = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [stage for stage in stages if stage not in STAGE_LABELS]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"{text!r}: give stages of {','.join(STAGE_LABELS)}, e.g. 'final' or "
                                         "'pre,post'")
    return stages


def parse_args(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--alg_name", required=True, help=f"one of {', '.join(algorithm_names())}")
    parser.add_argument("--hparams_fname", required=True, help="file in hparams/<ALG>/ or a path")
    parser.add_argument("--hparams", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override values of the hyperparameter file, e.g. --hparams v_lr=0.1 layers=[3,4] "
                             "(JSON values, else strings)")
    parser.add_argument("--ds_name", choices=list(DATASETS), default="mcf",
                        help="; ".join(f"{name}: {what}" for name, what in DATASETS.items()))
    parser.add_argument("--dataset_size_limit", type=int, default=None,
                        help="edit the first N usable records (an error if the dataset has fewer)")
    parser.add_argument("--num_edits", type=int, default=1, help="records edited together in one round")
    parser.add_argument("--continue_from_run", default=None, help="resume results/<ALG>/run_NNN")
    parser.add_argument("--skip_generation_tests", action="store_true", help="no fluency/consistency")
    parser.add_argument("--skip_free_generation", action="store_true",
                        help="no free-generation metric (greedy answers judged as text, docs/DESIGN.md section 7; "
                             "about 3x the teacher-forced scoring's time, little next to the generation tests)")
    parser.add_argument("--generation_test_interval", type=int, default=1, help="generation tests every N-th case id")
    parser.add_argument("--generation_stages", type=stage_list, default=None, metavar="STAGE[,STAGE]",
                        help="evaluation stages with the generation tests, of pre,post,final (default: final for "
                             "sequential runs with a final evaluation, as AlphaEdit's protocol; pre,post otherwise, "
                             "as MEMIT's). A resumed run adds them to finished cases whose pre or final stage "
                             "lacks them")
    parser.add_argument("--generation_protocol", choices=["published", "greedy"], default="published",
                        help="fluency/consistency texts: published = MEMIT's top-k 5 sampling, 100 tokens with the "
                             "prompt, seeded by --seed and the case id; greedy = argmax, 50 new tokens")
    parser.add_argument("--downstream_eval_steps", type=int, default=0,
                        help="downstream check before round 1 and after every N rounds (0 = off)")
    parser.add_argument("--downstream_examples", type=int, default=100, help="examples per downstream task")
    parser.add_argument("--eval_batch_size", type=int, default=64,
                        help="prompts scored together in the evaluation (answers decode 4 such batches at a time)")
    for switch in REMOVED_SWITCHES:
        parser.add_argument(f"--{switch}", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                        help="keep edits between rounds (default: on for sequential methods)")
    parser.add_argument("--skip_final_eval", action="store_true", help="sequential runs: no 'final' evaluation")
    parser.add_argument("--device_map", default=None, help="e.g. 'auto' to shard the model over GPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results_dir", default=None, help="else ECE_RESULTS_DIR, globals.yml")
    args = parser.parse_args(argv)
    for switch, message in REMOVED_SWITCHES.items():
        if getattr(args, switch):
            parser.error(message)
    if args.num_edits < 1:
        parser.error("--num_edits must be >= 1")
    if args.generation_test_interval < 1:
        parser.error("--generation_test_interval must be >= 1")
    if args.dataset_size_limit is not None and args.dataset_size_limit < 0:
        parser.error("--dataset_size_limit must be >= 0")
    if args.downstream_examples < 1 or args.eval_batch_size < 1:
        parser.error("--downstream_examples and --eval_batch_size must be >= 1")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    setup_logging(args.verbose, logging.INFO)
    set_seed(args.seed)
    algorithm = get_algorithm(args.alg_name)
    hparams_path = resolve_hparams_path(algorithm, args.hparams_fname)
    overrides = parse_overrides(args.hparams)
    hparams = load_hparams(algorithm, hparams_path, overrides)
    sequential = algorithm.sequential_by_default if args.sequential is None else args.sequential
    final_evaluation = sequential and not args.skip_final_eval
    generation_stages = args.generation_stages or (("final",) if final_evaluation else ("pre", "post"))
    if "final" in generation_stages and not final_evaluation:
        raise RunError("--generation_stages final needs a final evaluation: a sequential run without "
                       "--skip_final_eval (only those have a 'final' stage)")
    records = load_records(args.ds_name, args.data_dir, args.dataset_size_limit)
    if not records:
        raise RunError("the dataset selection is empty")
    requests = [record_to_request(r) for r in records]
    if algorithm.check_requests is not None:  # refused now, not after the first round's evaluation
        algorithm.check_requests(requests, hparams)
    if args.downstream_eval_steps > 0 and not sequential:
        raise RunError("--downstream_eval_steps measures the model as edits accumulate; it needs a sequential "
                       "run (add --sequential, or set --downstream_eval_steps 0)")

    run_params = {
        "alg_name": algorithm.name, "model_name": args.model_name, "hparams_fname": str(hparams_path),
        "hparams_overrides": overrides, "eval_batch_size": args.eval_batch_size,
        "ds_name": args.ds_name, "dataset_size_limit": args.dataset_size_limit, "num_edits": args.num_edits,
        "sequential": sequential, "seed": args.seed, "generation_protocol": args.generation_protocol,
        "generation_stages": None if args.skip_generation_tests else list(generation_stages),
        "generation_test_interval": args.generation_test_interval,
        "free_generation": None if args.skip_free_generation else FreeGeneration().to_dict(),
        "device": args.device, "dtype": args.dtype,
        "device_map": args.device_map, "hparams": hparams.to_dict(), "evaluation_stages": STAGE_LABELS,
        "downstream_eval_steps": args.downstream_eval_steps, "argv": sys.argv if argv is None else list(argv),
        "dataset_skipped": getattr(records, "skipped", None),
        "torch_version": torch.__version__,
    }
    alg_dir = Path(args.results_dir or get_paths().results_dir) / algorithm.name
    if args.continue_from_run:
        run_dir = continue_run_dir(alg_dir, args.continue_from_run, run_params, type(hparams).defaults())
    else:
        run_dir = start_run_dir(alg_dir, run_params, effective_hparams_file(hparams_path, overrides))

    model, tok = load_model_and_tokenizer(args.model_name, args.device, args.dtype, args.device_map)
    context = EditContext(args.model_name, data_dir=args.data_dir, seed=args.seed)
    edited_modules = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    original_weights = snapshot_weights(model, edited_modules)
    evaluate_case = Evaluator(args.ds_name, args.data_dir, args.skip_generation_tests,
                              args.generation_test_interval, batch_size=args.eval_batch_size,
                              generation_protocol=args.generation_protocol, seed=args.seed,
                              free_generation=not args.skip_free_generation, generation_stages=generation_stages)

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
    checkpoints = CheckpointSchedule(args.downstream_eval_steps, run_dir, args.downstream_examples, args.data_dir)
    generic_text = GenericText(tok, statistics_chunks=statistics_chunks(hparams), data_dir=args.data_dir)
    clock = RunClock(run_dir / "timing.json", len(rounds), len(records), final_evaluation=final_evaluation)

    def checkpoint(rounds_done: int) -> None:
        if not checkpoints.due(rounds_done):
            return
        edit_count = state_edits(rounds, rounds_done - 1) if rounds_done else 0
        with clock.stage("downstream"):
            checkpoints.downstream(model, tok, rounds_done, edit_count)
        if sequential:
            # After the last round the final evaluation scores the same model record by record.
            last_with_final = rounds_done == len(rounds) and final_evaluation and algorithm.finish is None
            with clock.stage("curves"):
                checkpoints.curve(model, tok, rounds_done, edit_count, [] if last_with_final else records[:edit_count],
                                  evaluate_case, original_weights, generic_text)

    checkpoint(rounds_done=0)
    progress = tqdm(rounds, desc=f"{algorithm.name} rounds", unit="round")
    for round_index, members in enumerate(progress):
        paths = [case_path(run_dir, args.num_edits, records[i]["case_id"]) for i in members]
        if (sequential and round_index < rounds_done) or (not sequential and all(p.exists() for p in paths)):
            continue
        round_start = time.perf_counter()
        round_requests = [requests[i] for i in members]
        with clock.stage("pre"), temporarily_loaded(model, original_weights):
            pre = evaluate_case.many(model, tok, [records[i] for i in members], "pre")
        set_seed(args.seed + round_index)
        start = time.perf_counter()
        with clock.stage("edit"):
            report = algorithm.apply(model, tok, round_requests, hparams, context, state)
        edit_seconds = time.perf_counter() - start
        LOG.info("round %d: %d edits in %.1fs %s", round_index, len(members), edit_seconds, report.seconds)
        if report.explanation is not None:
            atomic_write_json(explanation_path(run_dir, round_index), {"round": round_index, **report.explanation})
        post_start = time.perf_counter()
        with clock.stage("post"):
            post = evaluate_case.many(model, tok, [records[i] for i in members], "post")
        post_seconds = time.perf_counter() - post_start
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
            checkpoint(rounds_done=round_index + 1)
            save_sequential_state(state_file, model, edited_modules, state, rounds_done=round_index + 1)
        else:
            load_weights(model, original_weights)
        edits_done = sum(len(r) for r in rounds[:round_index + 1])
        progress.set_postfix_str(f"{edits_done}/{len(records)} edits")
        LOG.info(clock.round_done(round_index + 1, edits_done, time.perf_counter() - round_start, len(members),
                                  post_seconds))

    if "pre" in generation_stages:
        with clock.stage("pre"), temporarily_loaded(model, original_weights):
            add_missing_generation_tests(model, tok, evaluate_case, records, run_dir, args.num_edits, "pre")
    if sequential and algorithm.finish is not None and state is not None and not state.finished:
        finished = algorithm.finish(model, hparams, state)
        state.finished = True
        LOG.info("%s after the last round: %s", algorithm.name, finished)
        save_sequential_state(state_file, model, edited_modules, state, rounds_done=len(rounds))
    if sequential and not args.skip_final_eval:
        with clock.stage("final"):
            bar = tqdm(total=len(records), desc="final evaluation", unit="case")
            for group in chunks(records, FINAL_EVALUATION_GROUP):
                paths = [case_path(run_dir, args.num_edits, record["case_id"]) for record in group]
                cases = [json.loads(path.read_text()) for path in paths]
                if any("final" not in case for case in cases):
                    # The whole group, as in an uninterrupted run: the same batches give the same floats. The
                    # generation tests follow for all groups at once (add_missing_generation_tests).
                    for path, case, metrics in zip(paths, cases, evaluate_case.many(model, tok, group, "final",
                                                                                generation=False)):
                        if "final" not in case:
                            case["final"] = metrics
                            atomic_write_json(path, case)
                bar.update(len(group))
            bar.close()
            if "final" in generation_stages:
                add_missing_generation_tests(model, tok, evaluate_case, records, run_dir, args.num_edits, "final")
        clock.save()
    LOG.info("done: %s", run_dir)
    return run_dir


def add_missing_generation_tests(model, tok, evaluate_case: Evaluator, records, run_dir: Path, num_edits: int,
                                 stage: str) -> int:
    """Add the generation tests to the finished cases whose ``stage`` was scored without them (the final stage
    of a sequential run, or a run made before that stage had them), on the model as it is now; returns how many
    cases got them. The texts of ``GENERATION_GROUP`` cases are sampled together (a step of many rows costs
    little more than one of a few) and those cases saved as they end."""
    lacking = []
    for record in records:
        path = case_path(run_dir, num_edits, record["case_id"])
        if not evaluate_case.generation_due(record) or not path.exists():
            continue
        case = json.loads(path.read_text())
        if stage in case and "ngram_entropy" not in case[stage]:
            lacking.append((record, path, case))
    for group in chunks(lacking, GENERATION_GROUP):
        for (_, path, case), metrics in zip(group, evaluate_case.generation_only(model, tok, [r for r, _, _ in group])):
            case[stage].update(metrics)
            atomic_write_json(path, case)
    if lacking:
        LOG.info("added the generation tests to the '%s' stage of %d finished cases", stage, len(lacking))
    return len(lacking)


def cli(argv=None) -> int:
    return run_script(main, argv, "interrupted: every finished case file is on disk; resume with --continue_from_run")


if __name__ == "__main__":
    sys.exit(cli())
