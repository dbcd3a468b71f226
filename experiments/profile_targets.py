"""Where the target-value stage spends its time: one fact per loop (MEMIT) against all facts in one loop (ECE).

Both schedules optimise requests for the same fixed number of steps (early stopping off, so the work per
fact is equal) under ``torch.profiler``: all ``--num_edits`` facts in one loop, and the first
``--per_fact_sample`` of them one loop each (every per-fact loop is alike, and the profiler's memory
grows with every operator it records: about 0.2 GB per profiled step of this model). Each operator's
own time goes to a category (matrix products, attention, normalisation and activations, the Adam step,
data movement, ...), and the matrix products' FLOPs give their achieved rate, next to a plain large
matrix product on the same machine:

    python experiments/profile_targets.py --model_name smollm2-135m --num_edits 20 --steps 5

The table answers two questions: how far the matrix products themselves are from the machine's rate at
each batch size, and how much of the stage is not matrix products at all.
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from editing.context import EditContext  # noqa: E402
from editing.target_values import compute_target_values  # noqa: E402
from experiments.algorithms import get_algorithm  # noqa: E402
from experiments.benchmark import matmul_rate  # noqa: E402
from experiments.driver import (COUNTERFACT_DATASETS, RunError, load_hparams, load_records, record_to_request,  # noqa: E402
                                resolve_hparams_path)
from util.cli import run_script, script_parser, setup_logging  # noqa: E402
from util.io import atomic_write_json  # noqa: E402
from util.models import default_device, load_model_and_tokenizer, parse_dtype  # noqa: E402

# Operator name (without "aten::") -> category; names not listed fall back to the fragments below.
CATEGORY_OF = {
    **dict.fromkeys(("mm", "addmm", "matmul", "linear", "dot", "mv", "bmm", "baddbmm"), "matmul"),
    **dict.fromkeys(("_softmax", "_log_softmax", "_log_softmax_backward_data", "_softmax_backward_data",
                     "log_softmax", "softmax", "gather", "nll_loss", "exp", "log"), "softmax / loss"),
    **dict.fromkeys(("silu", "silu_backward", "gelu", "gelu_backward", "tanh", "rsqrt", "pow", "mean",
                     "native_layer_norm", "native_layer_norm_backward", "sigmoid", "neg", "cos", "sin"),
                    "norm / activation"),
    **dict.fromkeys(("copy_", "cat", "index", "index_put_", "_index_put_impl_", "index_add_", "index_select",
                     "slice", "select", "to", "_to_copy", "contiguous", "clone", "expand", "view", "reshape",
                     "_unsafe_view", "transpose", "permute", "stack", "split", "narrow", "unsqueeze", "t", "fill_",
                     "zero_", "empty", "empty_strided", "as_strided", "scatter", "scatter_add_", "where",
                     "masked_fill", "slice_backward", "select_backward", "index_put", "new_zeros", "zeros",
                     "full", "arange", "ones_like", "zeros_like", "resolve_conj", "detach", "alias"),
                    "data movement"),
    **dict.fromkeys(("mul", "mul_", "add", "add_", "sub", "div", "div_", "sum", "rsub", "clamp", "clamp_min",
                     "norm", "linalg_vector_norm", "sqrt", "reciprocal"), "elementwise"),
}
FRAGMENTS = (("attention", "attention"), ("foreach", "optimiser"), ("adam", "optimiser"))
CATEGORIES = ("matmul", "attention", "softmax / loss", "norm / activation", "elementwise", "data movement",
              "optimiser", "other")


def category(name: str) -> str:
    short = name.split("::")[-1]
    if short in CATEGORY_OF:
        return CATEGORY_OF[short]
    return next((label for fragment, label in FRAGMENTS if fragment in short.lower()), "other")


def profile_schedule(model, tok, requests, hparams, templates, requests_per_loop: Optional[int],
                     top_ops: int = 12) -> dict:
    """Run the target-value stage once under the profiler; seconds and FLOPs per category."""
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        values = compute_target_values(model, tok, requests, hparams, templates, z_layer=hparams.layers[-1],
                                       requests_per_loop=requests_per_loop)
    wall = time.perf_counter() - start
    seconds: Dict[str, float] = defaultdict(float)
    flops: Dict[str, float] = defaultdict(float)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    top = [{"op": e.key, "category": category(e.key), "seconds": e.self_cpu_time_total / 1e6, "calls": e.count,
            "gflop": (e.flops or 0.0) / 1e9} for e in events[:top_ops]]
    for event in events:
        if event.self_cpu_time_total <= 0 and not event.flops:
            continue
        label = category(event.key)
        seconds[label] += event.self_cpu_time_total / 1e6
        flops[label] += event.flops or 0.0
    return {"requests_per_loop": requests_per_loop, "facts": len(requests), "loops": values.loops,
            "forward_tokens": values.forward_tokens, "wall_seconds": wall,
            "seconds_per_fact_step": wall / (len(requests) * hparams.v_num_grad_steps),
            "profiled_seconds": sum(seconds.values()),
            "seconds": dict(seconds), "gflop": {k: v / 1e9 for k, v in flops.items() if v}, "top_ops": top}


def print_table(rows: List[dict], matmul_gflops: float) -> None:
    names = [f"{r['requests_per_loop'] or 'all'} per loop" for r in rows]
    print(f"{'':<22}" + "".join(f"{n:>24}" for n in names))
    print(f"{'facts':<22}" + "".join(f"{r['facts']:24d}" for r in rows))
    print(f"{'wall seconds':<22}" + "".join(f"{r['wall_seconds']:24.1f}" for r in rows))
    print(f"{'s per fact and step':<22}" + "".join(f"{r['seconds_per_fact_step']:24.3f}" for r in rows))
    print(f"{'loops / tokens':<22}" + "".join(f"{str(r['loops']) + ' / ' + str(r['forward_tokens']):>24}" for r in rows))
    for label in CATEGORIES:
        cells = []
        for r in rows:
            s = r["seconds"].get(label, 0.0)
            gflop = r["gflop"].get(label)
            rate = f" {gflop / s:5.1f}GF/s" if gflop and s else " " * 11
            cells.append(f"{s:7.1f}s {100 * s / r['profiled_seconds']:4.0f}%{rate}")
        print(f"{label:<22}" + "".join(f"{c:>24}" for c in cells))
    for name, r in zip(names, rows):
        print(f"\nslowest operators, {name}:")
        for op in r["top_ops"]:
            print(f"  {op['op']:<52}{op['category']:<20}{op['seconds']:7.2f}s{op['calls']:8d} calls")
    print(f"plain {2048}x{2048} matmul on this machine: {matmul_gflops:.1f} GFLOP/s "
          "(seconds are the operators' own time under the profiler; GF/s where the profiler counts FLOPs)")


def parse_args(argv=None):
    parser = script_parser(__doc__, results_file=True)
    parser.add_argument("--hparams_fname", default=None, help="MEMIT hparams (default <model_name>.json)")
    parser.add_argument("--ds_name", choices=COUNTERFACT_DATASETS, default="mcf")
    parser.add_argument("--num_edits", type=int, default=20)
    parser.add_argument("--per_fact_sample", type=int, default=4, help="facts profiled in one loop each")
    parser.add_argument("--steps", type=int, default=5, help="optimisation steps per loop (early stopping off)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if min(args.num_edits, args.steps, args.per_fact_sample) < 1:
        raise RunError("--num_edits, --steps and --per_fact_sample must be >= 1")
    args.device = args.device or default_device()
    if args.device.startswith("cuda"):
        raise RunError("the category breakdown reads CPU operator time; run it with --device cpu")
    memit = get_algorithm("MEMIT")
    path = resolve_hparams_path(memit, args.hparams_fname or f"{args.model_name}.json")
    # Fixed work: every request runs every step (a stopping loss of 0 is never reached).
    hparams = load_hparams(memit, path, {"v_num_grad_steps": args.steps, "v_stop_loss": 0.0})
    model, tok = load_model_and_tokenizer(args.model_name, args.device, args.dtype)
    requests = [record_to_request(r) for r in load_records(args.ds_name, args.data_dir, args.num_edits)]
    templates = EditContext(args.model_name, data_dir=args.data_dir).context_templates(
        model, tok, hparams.context_template_length_params)
    matmul = matmul_rate(args.device, parse_dtype(args.dtype, args.device))
    rows = [profile_schedule(model, tok, requests[: args.per_fact_sample], hparams, templates, 1),
            profile_schedule(model, tok, requests, hparams, templates, None)]
    print_table(rows, matmul)
    result = {"model": args.model_name, "num_edits": args.num_edits, "per_fact_sample": args.per_fact_sample,
              "steps": args.steps,
              "torch_threads": torch.get_num_threads(), "matmul_gflops_per_second": matmul, "rows": rows}
    if args.out:
        atomic_write_json(Path(args.out), result, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))
