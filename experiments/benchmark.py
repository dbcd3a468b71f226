"""Editing speed side by side: every algorithm edits the same records in one process.

    python experiments/benchmark.py --algs MEMIT,ECE_WI --model_name smollm2-135m --ds_name mcf \
        --num_edits 100 --rounds 1 --out bench.json

Each algorithm starts from a fresh copy of the model (reloaded from the local cache), shares the cached
statistics and the context templates, and applies ``--rounds`` rounds of ``--num_edits`` edits one
after another (with C_prev where the method keeps it). Recorded per algorithm: seconds per stage (the
statistics, templates, explain, cluster, target values, update, and the evaluation kept apart),
seconds per round, edits per second, peak memory, target-value loops, steps per fact and tokens, and efficacy /
generalization / specificity of all edited cases on the final model, as probability comparisons, as
teacher-forced top-1 (``*_top1``) and under free greedy generation (``*_free``; fEff/fGen/fSpe in the table).

An algorithm may carry hparams overrides, ``NAME:key=value:key=value`` (JSON values, parsed as
``evaluate.py --hparams key=value`` is), e.g.
``MEMIT:z_prefix_cache=false`` for the published cost of MEMIT's target values. The "distance to the
limit" columns compare the floating-point rate of the target-value stage with a plain large matrix
multiplication on the same machine, measured in the same run.

``--model_name random:gpt2-xl`` or ``random:llama3-8b`` (``util.random_models``) measures the seconds and
memory at the paper's sizes with random weights, where the real weights cannot be fetched; the shipped
``gpt2-xl.json`` / ``Llama3-8B.json`` hparams are the default, and the edit quality of such a run means nothing.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing.context import EditContext  # noqa: E402
from editing.sequential import SequentialState  # noqa: E402
from experiments.algorithms import get_algorithm  # noqa: E402
from experiments.driver import (COUNTERFACT_DATASETS, Evaluator, RunError,  # noqa: E402
                                load_hparams, load_records, parse_algorithm_spec, record_to_request,
                                resolve_hparams_path, set_seed)
from experiments.free_generation import FreeGeneration  # noqa: E402
from experiments.metrics import (COUNTERFACT, FREE_METRICS, TOP1_METRICS, counterfact_case_metrics,  # noqa: E402
                                 summarize_stage)
from util.cli import run_script, script_parser, setup_logging  # noqa: E402
from util.hooks import get_module  # noqa: E402
from util.io import atomic_write_json  # noqa: E402
from util.models import default_device, load_model_and_tokenizer, parse_dtype  # noqa: E402
from util.random_models import is_random_model_name, random_model_hparams_fname  # noqa: E402

LOG = logging.getLogger("benchmark")

STAGES = ("statistics", "templates", "explain", "cluster", "target_values", "update")


class PeakMemory:
    """Peak resident memory (and CUDA peak allocation) while the block runs, sampled every 20 ms."""

    def __init__(self):
        self.rss_mb = 0.0
        self.cuda_mb: Optional[float] = None
        self._stop = threading.Event()

    @staticmethod
    def current_rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: the process-wide peak is the best available
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self):
        while not self._stop.wait(0.02):
            self.rss_mb = max(self.rss_mb, self.current_rss_mb())

    def __enter__(self):
        self.rss_mb = self.current_rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rss_mb = max(self.rss_mb, self.current_rss_mb())
        if torch.cuda.is_available():
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20
        return False


def matmul_rate(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a plain ``size x size`` matrix product: the machine's practical ceiling."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def target_flops_per_token(model, hparams) -> float:
    """Matmul FLOPs per token of one optimisation step: forward through the decoder layers up to the
    loss layer, backward (activation gradients only: the weights are frozen) from there down to the
    edited layer. Attention scores and the output head at the target positions are left out."""
    per_layer = sum(p.numel() for p in get_module(model, hparams.layer_module(0)).parameters() if p.dim() == 2)
    forward_layers = hparams.v_loss_layer + 1
    backward_layers = hparams.v_loss_layer - hparams.layers[-1]
    return 2.0 * per_layer * (forward_layers + backward_layers)


def default_hparams_fname(model_name: str) -> str:
    """``<model_name>.json``; a random-weight model uses the file of the real model it copies."""
    return random_model_hparams_fname(model_name) if is_random_model_name(model_name) else f"{model_name}.json"


def model_shape(model) -> dict:
    """The sizes the measurement ran at, read from the model itself (a random model's name could lie)."""
    config = model.config
    heads = config.num_attention_heads
    first = next(model.parameters())
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "mlp": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
            or 4 * config.hidden_size,
            "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "vocab": model.get_output_embeddings().weight.shape[0],
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(first.dtype).replace("torch.", ""),
            "device": str(first.device)}


QUALITY_METRICS = ("efficacy", "generalization", "specificity") + TOP1_METRICS + FREE_METRICS


def edit_quality(case_metrics: List[dict]) -> Dict[str, Optional[float]]:
    """Mean success (%) on the final model: probability comparison, teacher-forced top-1 (``*_top1``) and
    free generation (``*_free``, experiments/free_generation.py)."""
    summary = summarize_stage(case_metrics, COUNTERFACT, "final")
    return {m: (summary[m]["mean"] if summary.get(m) else None) for m in QUALITY_METRICS}


def run_algorithm(spec: str, args, records, context: EditContext, evaluate_case: Evaluator) -> dict:
    name, overrides = parse_algorithm_spec(spec)
    algorithm = get_algorithm(name)
    hparams_path = resolve_hparams_path(algorithm, args.hparams_fname or default_hparams_fname(args.model_name))
    hparams = load_hparams(algorithm, hparams_path, overrides)
    model, tok = load_model_and_tokenizer(args.model_name, args.device, args.dtype)
    state = SequentialState(track_prev_moments=algorithm.keeps_prev_moments) if algorithm.uses_sequential_state else None
    seconds: Dict[str, float] = {}
    round_seconds, loops, tokens, clusters, steps = [], 0, 0, [], []
    requests = [record_to_request(r) for r in records]
    rounds = [requests[i : i + args.num_edits] for i in range(0, len(requests), args.num_edits)]
    with PeakMemory() as memory:
        for index, round_requests in enumerate(tqdm(rounds, desc=spec, unit="round", leave=False)):
            set_seed(args.seed + index)
            start = time.perf_counter()
            report = algorithm.apply(model, tok, round_requests, hparams, context, state)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            round_seconds.append(time.perf_counter() - start)
            for stage, value in report.seconds.items():
                seconds[stage] = seconds.get(stage, 0.0) + value
            loops += report.target_loops
            tokens += report.target_forward_tokens
            steps += report.target_steps
            if "n_clusters" in report.extra:
                clusters.append(report.extra["n_clusters"])
        if algorithm.finish is not None and state is not None:
            start = time.perf_counter()
            algorithm.finish(model, hparams, state)
            round_seconds[-1] += time.perf_counter() - start  # the last round's work
    start = time.perf_counter()
    if is_random_model_name(args.model_name):  # random weights: no quality to score, and on paper-scale
        quality = {m: None for m in QUALITY_METRICS}  # models the scoring takes longer than the round
    else:
        quality = edit_quality([counterfact_case_metrics(m) for m in evaluate_case.many(model, tok, records)])
    evaluation_seconds = time.perf_counter() - start
    total = sum(round_seconds)
    z_seconds = seconds.get("target_values", 0.0)
    flops = tokens * target_flops_per_token(model, hparams)
    row = {
        "alg": spec, "round_seconds": total / len(round_seconds), "rounds": len(round_seconds),
        "each_round_seconds": round_seconds,  # the first also pays one-off work (z_compile's compilation)
        "z_seconds": z_seconds, "update_seconds": seconds.get("update", 0.0),
        "stage_seconds": {s: seconds.get(s, 0.0) for s in STAGES},
        "evaluation_seconds": evaluation_seconds,
        "edits_per_second": len(records) / total,
        "peak_memory_mb": memory.rss_mb, "peak_cuda_memory_mb": memory.cuda_mb,
        "target_loops": loops, "target_forward_tokens": tokens,
        "mean_target_steps": sum(steps) / len(steps) if steps else None,
        "target_gflops_per_second": flops / z_seconds / 1e9 if z_seconds else None,
        "n_clusters": clusters or None, "hparams_overrides": overrides,
        "hparams": {"file": str(hparams_path), "v_num_grad_steps": hparams.v_num_grad_steps,
                    "v_stop_loss": hparams.v_stop_loss, "mom2_dataset": hparams.mom2_dataset,
                    "mom2_keys_per_dimension": hparams.mom2_keys_per_dimension},
        "model_shape": model_shape(model),
        **quality,
    }
    del model
    LOG.info("%s: %.1f s per round, %.1f s target values, %.1f s update", spec, row["round_seconds"], z_seconds,
             row["update_seconds"])
    return row


def print_table(rows: List[dict], matmul_gflops: float) -> None:
    reference = next((r for r in rows if r["alg"] == "MEMIT"), None) or next(
        (r for r in rows if parse_algorithm_spec(r["alg"])[0] == "MEMIT"), rows[0])
    width = max(len(r["alg"]) for r in rows) + 2
    header = (f"{'algorithm':<{width}}{'s/round':>9}{'x MEMIT':>8}{'z s':>8}{'upd s':>7}{'edit/s':>8}{'loops':>6}"
              f"{'steps':>6}"
              f"{'GF/s z':>8}{'% mm':>6}{'peak MB':>9}{'Eff':>6}{'Gen':>6}{'Spe':>6}"
              f"{'fEff':>6}{'fGen':>6}{'fSpe':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rate = r["target_gflops_per_second"] or 0.0
        fmt = lambda v: f"{v:6.1f}" if v is not None else "     -"
        print(f"{r['alg']:<{width}}{r['round_seconds']:9.1f}{reference['round_seconds'] / r['round_seconds']:8.2f}"
              f"{r['z_seconds']:8.1f}{r['update_seconds']:7.1f}{r['edits_per_second']:8.3f}{r['target_loops']:6d}"
              f"{r['mean_target_steps'] or 0.0:6.1f}"
              f"{rate:8.1f}{100 * rate / matmul_gflops:6.1f}{r['peak_memory_mb']:9.0f}"
              f"{fmt(r['efficacy'])}{fmt(r['generalization'])}{fmt(r['specificity'])}"
              f"{fmt(r.get('efficacy_free'))}{fmt(r.get('generalization_free'))}{fmt(r.get('specificity_free'))}")
    print(f"plain matmul: {matmul_gflops:.1f} GFLOP/s ('steps': optimisation steps per fact; "
          f"'% mm': target-value rate as a share of it; fEff/fGen/fSpe: free greedy generation; "
          f"x MEMIT: {reference['alg']}'s seconds per round / this row's)")


def parse_args(argv=None):
    parser = script_parser(__doc__, results_file=True)
    parser.add_argument("--algs", required=True, help="comma-separated, e.g. MEMIT,ECE_WI,MEMIT:z_prefix_cache=false")
    parser.add_argument("--hparams_fname", default=None,
                        help="default <model_name>.json in each hparams/<ALG>/ (random:gpt2-xl: gpt2-xl.json)")
    parser.add_argument("--ds_name", choices=COUNTERFACT_DATASETS, default="mcf")
    parser.add_argument("--num_edits", type=int, default=100, help="edits per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_edits < 1 or args.rounds < 1:
        parser.error("--num_edits and --rounds must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(args.verbose)
    args.device = args.device or default_device()
    specs = [s.strip() for s in args.algs.split(",") if s.strip()]
    for spec in specs:
        get_algorithm(parse_algorithm_spec(spec)[0])  # fail before any work on a bad name
    records = load_records(args.ds_name, args.data_dir, args.num_edits * args.rounds)
    if len(records) < args.num_edits * args.rounds:
        raise RunError(f"the dataset has {len(records)} records, fewer than {args.num_edits} x {args.rounds}")
    context = EditContext(args.model_name, data_dir=args.data_dir, seed=args.seed)
    evaluate_case = Evaluator(args.ds_name, args.data_dir, skip_generation=True, interval=1, batch_size=64)
    matmul = matmul_rate(args.device, parse_dtype(args.dtype, args.device))
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__},
        "model": args.model_name, "ds_name": args.ds_name, "num_edits": args.num_edits, "rounds": args.rounds,
        "seed": args.seed, "matmul_gflops_per_second": matmul, "dtype": args.dtype,
        # A random-weight model (util.random_models): the seconds and memory hold, edit quality means nothing.
        "random_weights": is_random_model_name(args.model_name),
        # how the *_free rates were decoded and judged (experiments/free_generation.py)
        "free_generation": FreeGeneration().to_dict(), "rows": [],
    }
    for spec in tqdm(specs, desc="algorithms", unit="alg"):
        result["rows"].append(run_algorithm(spec, args, records, context, evaluate_case))
        if args.out:  # after every algorithm, so a crash later loses nothing
            atomic_write_json(Path(args.out), result, indent=2)
    print_table(result["rows"], matmul)
    if result["random_weights"]:
        print(f"{args.model_name} has RANDOM weights: seconds and memory only, Eff/Gen/Spe mean nothing")
    return result


def cli(argv=None) -> int:
    return run_script(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
