"""Evaluation speed: a round's records scored one at a time against together (``Evaluator.many``).

    python experiments/benchmark_evaluation.py --ds_names cf_easyedit mcf --n_records 100 --out eval_bench.json

On the unedited model, for each dataset: seconds per record with the free-generation metric and without it
(teacher forcing only), one record per call and all ``--n_records`` in one call, and how far the two ways
agree (largest NLL difference, prompts whose top-1 flag or greedy answer differ). Generation tests (fluency)
are left out: they are per record either way.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.driver import DATASETS, Evaluator, load_records  # noqa: E402
from util.cli import run_script, script_parser, setup_logging  # noqa: E402
from util.io import atomic_write_json  # noqa: E402
from util.models import load_model_and_tokenizer  # noqa: E402

LOG = logging.getLogger(__name__)


def agreement(together: List[dict], alone: List[dict]) -> dict:
    """Largest NLL difference and the number of per-prompt flags or answers that differ."""
    largest, differing = 0.0, 0
    for joint, single in zip(together, alone):
        for key, value in joint.items():
            if key.endswith("_probs"):
                for a, b in zip(value, single[key]):
                    largest = max(largest, *(abs(a[t] - b[t]) for t in ("target_new", "target_true")))
            elif key.endswith("_correct") or key.endswith("_text"):
                differing += sum(x != y for x, y in zip(value, single[key]))
    return {"max_nll_difference": largest, "differing_prompts": differing}


def measure(model, tok, ds_name: str, records: List[dict], free_generation: bool, batch_size: int,
            data_dir=None) -> dict:
    evaluator = Evaluator(ds_name, data_dir, skip_generation=True, interval=1, batch_size=batch_size,
                          free_generation=free_generation)
    evaluator(model, tok, records[0])  # warm-up
    start = time.perf_counter()
    alone = [evaluator(model, tok, record) for record in records]
    one_at_a_time = (time.perf_counter() - start) / len(records)
    start = time.perf_counter()
    together = evaluator.many(model, tok, records)
    batched = (time.perf_counter() - start) / len(records)
    return {"ds_name": ds_name, "free_generation": free_generation, "n_records": len(records),
            "seconds_per_record_alone": one_at_a_time, "seconds_per_record_together": batched,
            "speed_up": one_at_a_time / batched, **agreement(together, alone)}


def parse_args(argv=None):
    parser = script_parser(__doc__, results_file=True)
    parser.add_argument("--ds_names", nargs="+", default=["cf_easyedit", "mcf"], choices=list(DATASETS))
    parser.add_argument("--n_records", type=int, default=100)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    return parser.parse_args(argv)


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    setup_logging(args.verbose)
    model, tok = load_model_and_tokenizer(args.model_name, args.device, args.dtype)
    rows = []
    for ds_name in args.ds_names:
        records = load_records(ds_name, args.data_dir, args.n_records)
        for free_generation in (True, False):
            rows.append(measure(model, tok, ds_name, records, free_generation, args.eval_batch_size, args.data_dir))
    print(f"{'dataset':<14}{'free gen.':>10}{'s/record alone':>16}{'s/record together':>19}{'speed-up':>10}"
          f"{'max |dNLL|':>12}{'differing':>11}")
    for r in rows:
        print(f"{r['ds_name']:<14}{'yes' if r['free_generation'] else 'no':>10}{r['seconds_per_record_alone']:16.3f}"
              f"{r['seconds_per_record_together']:19.3f}{r['speed_up']:9.2f}x{r['max_nll_difference']:12.1e}"
              f"{r['differing_prompts']:11d}")
    if args.out:
        atomic_write_json(args.out, {"model_name": args.model_name, "torch_threads": torch.get_num_threads(),
                                     "rows": rows})
    return rows


def cli(argv=None) -> int:
    return run_script(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
