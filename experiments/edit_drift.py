"""How much a sequential run disturbed the model on generic text, the quantity AlphaEdit's null space protects.

For each run folder (its ``sequential_state.pt`` holds the edited weights after the last round) and
WikiText chunks that the statistics did not use (the ones after the first ``mom2_n_samples``):

- the relative change of each edited module's output on the unedited model's keys,
  ``sqrt(sum ||dW k||^2 / sum ||W k||^2)`` over all tokens: 0 when the edit leaves generic keys alone;
- the Frobenius norm and the largest singular value of each accumulated edit, and that value over the unedited
  weight's (PRUNE's bound is 1);
- the perplexity of the unedited and of the edited model on the same chunks.

    python experiments/edit_drift.py --model_name smollm2-135m --run_dirs results/AlphaEdit/run_000 \\
        results/MEMIT_seq/run_000 --n_samples 64
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from editing.layer_stats import load_corpus_text, text_chunks  # noqa: E402
from util.cli import run_script, script_parser, setup_logging  # noqa: E402
from util.errors import RunError  # noqa: E402
from util.hooks import TraceDict  # noqa: E402
from util.io import atomic_write_json  # noqa: E402
from util.models import load_model_and_tokenizer, model_device  # noqa: E402
from util.tokens import chunks  # noqa: E402
from util.weights import read_weight, temporarily_loaded  # noqa: E402

LOG = logging.getLogger(__name__)


def load_run(run_dir: Path) -> tuple:
    """``(params, edited weights)`` of a finished sequential run folder."""
    state_file, params_file = run_dir / "sequential_state.pt", run_dir / "params.json"
    if not state_file.exists() or not params_file.exists():
        raise RunError(f"{run_dir} has no sequential_state.pt and params.json: give the folder of a sequential "
                       "run (evaluate.py with a sequential method or --sequential)")
    weights = torch.load(state_file, map_location="cpu", weights_only=True)["weights"]
    return json.loads(params_file.read_text()), weights


@torch.no_grad()
def edit_drift(model, token_chunks: torch.Tensor, edited_runs: Sequence[Dict[str, torch.Tensor]],
               batch_size: int = 8, progress: bool = True) -> List[dict]:
    """For each run's edited weights: the relative output change of every edited module (on the unedited
    model's keys), the accumulated edit's Frobenius and spectral norms, and the perplexity before and after.
    One unedited forward per batch serves all runs."""
    names = list(dict.fromkeys(name for edited in edited_runs for name in edited))
    device = model_device(model)
    unedited = {name: read_weight(model, name).detach().double() for name in names}
    changes = []
    for edited in edited_runs:
        with temporarily_loaded(model, edited):
            changes.append({name: read_weight(model, name).detach().double() - unedited[name] for name in edited})
    total = dict.fromkeys(names, 0.0)
    moved = [dict.fromkeys(change, 0.0) for change in changes]
    nll_unedited, nll_edited, tokens = 0.0, [0.0] * len(edited_runs), 0

    def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))

    batches = list(chunks(range(len(token_chunks)), batch_size))
    for rows in tqdm(batches, desc=f"drift of {len(edited_runs)} runs", unit="batch", disable=not progress):
        ids = token_chunks[list(rows)].to(device)
        with TraceDict(model, names, retain_input=True) as traces:
            nll_unedited += summed_nll(model(input_ids=ids).logits, ids)
        keys = {name: traces[name].input.flatten(0, -2).to(unedited[name].device, torch.float64) for name in names}
        for name in names:
            total[name] += float((keys[name] @ unedited[name].T).pow(2).sum())
        for run, (edited, change) in enumerate(zip(edited_runs, changes)):
            for name in change:
                moved[run][name] += float((keys[name] @ change[name].T).pow(2).sum())
            with temporarily_loaded(model, edited):
                nll_edited[run] += summed_nll(model(input_ids=ids).logits, ids)
        tokens += ids[:, 1:].numel()
    perplexity = lambda nll: float(torch.tensor(nll / tokens).exp())
    return [{
        "relative_output_change": {name: (moved[run][name] / total[name]) ** 0.5 for name in change},
        **edit_norms(change, unedited),
        "perplexity_unedited": perplexity(nll_unedited),
        "perplexity_edited": perplexity(nll_edited[run]),
        "tokens": tokens,
    } for run, change in enumerate(changes)]


def edit_norms(change: Dict[str, torch.Tensor], unedited: Dict[str, torch.Tensor]) -> dict:
    """Per module of ``change`` (the accumulated edits ``W - W_0``): their Frobenius norm, largest singular value,
    and that value over ``W_0``'s (``unedited``)."""
    spectral = lambda weight: float(torch.linalg.matrix_norm(weight, 2))
    return {"edit_norm": {name: float(torch.linalg.matrix_norm(c)) for name, c in change.items()},
            "edit_spectral_norm": {name: spectral(c) for name, c in change.items()},
            "edit_spectral_ratio": {name: spectral(c) / spectral(unedited[name]) for name, c in change.items()}}


def generic_chunks(tok, skip: int, n_samples: int, sample_length: int, data_dir=None) -> torch.Tensor:
    """WikiText chunks ``skip .. skip + n_samples``: after those the statistics were computed on."""
    available = text_chunks(tok, load_corpus_text("wikitext", data_dir), skip + n_samples, sample_length)
    if len(available) < skip + n_samples:
        raise RunError(f"WikiText has {len(available)} chunks of {sample_length} tokens, fewer than the {skip} used "
                       f"for the statistics plus {n_samples}; lower --n_samples")
    return available[skip:]


def print_table(rows: List[dict]) -> None:
    names = list(rows[0]["relative_output_change"])
    short = [n.split(".")[-3] if n.count(".") >= 3 else n for n in names]
    print(f"{'run':<34}{'edits':>6}{'ppl before':>11}{'ppl after':>10}{'s(dW)/s(W)':>11}" + "".join(f"{'layer ' + s:>10}" for s in short))
    for r in rows:
        changes = "".join(f"{100 * r['relative_output_change'].get(n, float('nan')):9.2f}%" for n in names)
        ratio = max(r["edit_spectral_ratio"].values())
        print(f"{r['run']:<34}{r['edits']:>6}{r['perplexity_unedited']:11.3f}{r['perplexity_edited']:10.3f}"
              f"{ratio:11.3f}{changes}")
    print("layer columns: relative change of the edited module's output on generic-text keys, "
          "sqrt(sum ||dW k||^2 / sum ||W k||^2); max s(dW)/s(W): the largest singular value of the accumulated "
          "edit over the weight's, highest over the layers (PRUNE restrains above 1)")


def parse_args(argv=None):
    parser = script_parser(__doc__, results_file=True)
    parser.add_argument("--run_dirs", nargs="+", required=True, help="folders of finished sequential runs")
    parser.add_argument("--n_samples", type=int, default=64, help="WikiText chunks after the statistics' ones")
    parser.add_argument("--sample_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    return parser.parse_args(argv)


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    setup_logging(args.verbose)
    runs = [(Path(d), *load_run(Path(d))) for d in args.run_dirs]  # fail before loading the model
    for run_dir, params, _ in runs:
        if params.get("model_name") != args.model_name:
            raise RunError(f"{run_dir} edited {params.get('model_name')!r}, not {args.model_name!r}")
    model, tok = load_model_and_tokenizer(args.model_name, args.device, args.dtype)
    # Runs whose statistics used the same number of chunks share the text and the unedited forwards.
    by_skip: Dict[int, List[int]] = {}
    for index, (_, params, _) in enumerate(runs):
        by_skip.setdefault(int(params.get("hparams", {}).get("mom2_n_samples", 0)), []).append(index)
    results: Dict[int, dict] = {}
    for skip, indices in by_skip.items():
        token_chunks = generic_chunks(tok, skip, args.n_samples, args.sample_length, args.data_dir)
        drifts = edit_drift(model, token_chunks, [runs[i][2] for i in indices], args.batch_size)
        results.update(zip(indices, drifts))
    rows = [{"run": f"{params.get('alg_name')}/{run_dir.name}",
             "edits": len(list(run_dir.glob("*_edits-case_*.json"))), **results[index]}
            for index, (run_dir, params, _) in enumerate(runs)]
    print_table(rows)
    if args.out:
        atomic_write_json(Path(args.out), {"model": args.model_name, "n_samples": args.n_samples, "rows": rows}, indent=2)
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main))
