"""One table of the benchmark files scripts/device_measure.sh leaves in its output folder.

    python scripts/device_measure_summary.py OUT [--published_steps gpt2-xl=20,llama3-8b=25] [--json FILE]

Reads every ``bench_*.json`` and ``paper_*.json`` of ``OUT`` (files of experiments/benchmark.py), prints one
row per method and model (seconds per round, with and without the statistics, target-value and update
seconds, peak GPU memory) and the MEMIT / ECE_WI ratio per model (and writes them to ``--json``). Random-
weight models (``random:...``) get their efficacy labelled as meaningless, and their target-value seconds
scaled to the published number of steps (about linear in the steps) next to the measured ones.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.hparams import parse_overrides  # noqa: E402

# Overrides every paper-scale run carries: the method's name says enough without them.
COMMON_OVERRIDES = {"v_num_grad_steps", "v_stop_loss", "v_stop_most_probable_steps", "mom2_dataset",
                    "mom2_keys_per_dimension", "mom2_sample_length", "mom2_n_samples"}


def method_label(spec: str) -> str:
    """``MEMIT:z_prefix_cache=false:...`` -> ``MEMIT z_prefix_cache=false ...`` without the common overrides."""
    name, *pairs = spec.split(":")
    kept = [p for p in pairs if p.partition("=")[0] not in COMMON_OVERRIDES]
    if parse_overrides(kept) == {"z_prefix_cache": False, "z_below_cache": False}:
        return f"{name} (published cost)"
    return " ".join([name, *kept])


def model_label(model: str) -> str:
    return model.split("?", 1)[0]


def summary_rows(out_dir: Path, published_steps: Dict[str, int]) -> List[dict]:
    rows = []
    files = [*out_dir.glob("bench_*.json"), *out_dir.glob("paper_*.json")]
    for path in sorted(files, key=lambda p: (p.stat().st_mtime, p.name)):  # the order they were run in
        result = json.loads(path.read_text())
        for row in result["rows"]:
            shape = row.get("model_shape") or {}
            statistics = row["stage_seconds"].get("statistics", 0.0) / max(row["rounds"], 1)
            steps = (row.get("hparams") or {}).get("v_num_grad_steps")
            base = model_label(result["model"]).removeprefix("random:")
            published = published_steps.get(base) if result.get("random_weights") else None
            z_at_published = None
            if published and steps and steps > 1:  # steps - 1 updates per fact (the last step only scores)
                z_at_published = row["z_seconds"] * (published - 1) / (steps - 1)
            rows.append({
                "file": path.name, "method": method_label(row["alg"]), "model": model_label(result["model"]),
                "random_weights": bool(result.get("random_weights")),
                "shape": f"{shape.get('layers')}x{shape.get('hidden')}/{shape.get('mlp')}" if shape else "-",
                "dtype": shape.get("dtype") or result.get("dtype"), "steps_per_fact": row.get("mean_target_steps"),
                "v_num_grad_steps": steps, "published_steps": published,
                "round_seconds": row["round_seconds"], "statistics_seconds": statistics,
                "round_seconds_without_statistics": row["round_seconds"] - statistics,
                "target_seconds": row["z_seconds"], "target_seconds_at_published_steps": z_at_published,
                "update_seconds": row["update_seconds"], "peak_gpu_mb": row.get("peak_cuda_memory_mb"),
                "peak_rss_mb": row.get("peak_memory_mb"), "efficacy": row.get("efficacy"),
                "num_edits": result["num_edits"],
            })
    return rows


def ratios(rows: List[dict]) -> List[dict]:
    """MEMIT's seconds per round over ECE_WI's, per model (with and without the statistics)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by_method = {r["method"]: r for r in rows if r["model"] == model}
        memit, ece = by_method.get("MEMIT"), by_method.get("ECE_WI")
        if memit and ece and ece["round_seconds"] > 0 and ece["round_seconds_without_statistics"] > 0:
            out.append({"model": model, "memit_over_ece_wi": memit["round_seconds"] / ece["round_seconds"],
                        "without_statistics": memit["round_seconds_without_statistics"]
                        / ece["round_seconds_without_statistics"]})
    return out


def fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: List[dict]) -> None:
    columns = [("method", 28), ("model", 17), ("shape", 14), ("dtype", 9), ("edits", 6), ("steps", 6),
               ("s/round", 8), ("stats s", 8), ("w/o st", 8), ("target s", 9), ("z@publ", 7), ("update s", 9),
               ("peak GPU MB", 12), ("Eff", 9)]
    print("".join(f"{name:>{width}}" if i > 1 else f"{name:<{width}}" for i, (name, width) in enumerate(columns)))
    for r in rows:
        efficacy = "random" if r["random_weights"] else fmt(r["efficacy"])
        cells = [r["method"][:27], r["model"][:16], r["shape"], str(r["dtype"]), str(r["num_edits"]),
                 fmt(r["steps_per_fact"]), fmt(r["round_seconds"]), fmt(r["statistics_seconds"]),
                 fmt(r["round_seconds_without_statistics"]), fmt(r["target_seconds"]),
                 fmt(r["target_seconds_at_published_steps"]), fmt(r["update_seconds"]), fmt(r["peak_gpu_mb"], ".0f"),
                 efficacy]
        print("".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}" for i, (c, (_, w)) in enumerate(zip(cells, columns))))
    print("steps: optimisation updates per fact (v_num_grad_steps - 1 when no request stops early); "
          "stats s: the statistics inside the round (computed by the first method, read by the next); "
          "w/o st: s/round without them; z@publ: target s scaled to the published steps; "
          "Eff 'random': random weights, efficacy meaningless")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--published_steps", default="gpt2-xl=20,llama3-8b=25",
                        help="v_num_grad_steps of the shipped hparams per random model, for the z@publ column")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and ratios to this file")
    args = parser.parse_args(argv)
    published = {k: int(v) for k, _, v in (p.partition("=") for p in args.published_steps.split(",") if p)}
    rows = summary_rows(args.out_dir, published)
    if not rows:
        print(f"no benchmark files in {args.out_dir}", file=sys.stderr)
        return 1
    print_table(rows)
    model_ratios = ratios(rows)
    for r in model_ratios:
        print(f"{r['model']}: MEMIT / ECE_WI seconds per round {r['memit_over_ece_wi']:.2f} "
              f"(without the statistics {r['without_statistics']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": model_ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
