"""Are ECE's neurons the ones that hold a fact, and do similar facts share them? (docs/DESIGN.md section 5.7)

Facts: records of ``known_1000.json`` and of CounterFact (``mcf``) whose true target the unedited model
predicts first (its first token is the top-1 next token), taken alternately from the two files.

1. **Deletion and insertion curves.** Each neuron score ECE can use (``ece.explain``: WI, AS, RS, GA, and GA
   with integrated gradients) ranks the neurons of each edited layer for each fact, as does a random order.
   Deleting the top ``k`` (``--fractions`` of the layer) replaces them by zero or by their mean over WikiText
   at the ablated positions (the subject's last token, or all subject tokens); inserting keeps only the top
   ``k`` and replaces all the others. Each row records ``P(true target) / P(true target) unablated``. Curves
   are read at each edited layer alone and at all of them at once (the top ``k`` of every layer). A curve's
   area is its mean over the log-spaced fractions (trapezoids over ``log k``); deletion areas are low and
   insertion areas high for a faithful score. Intervals are 95% normal intervals over facts.
2. **Relation structure.** For each input-dependent score: the mean similarity of two facts of the same
   CounterFact/known relation against two of different relations, and the adjusted Rand index (ARI) of the
   spectral clusters (as many as relations) against ``relation_id``, for neuron sets (nucleus at several
   thresholds, or the top ``k``; Jaccard) and for the score vectors themselves (cosine), at each edited layer
   and over all of them; each against random sets (or permuted score vectors) of the same sizes.

    python experiments/explain_faithfulness.py --model_name smollm2-135m --n_facts 200 --out faith.json \\
        --plots faith_plots
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsets import KnownsDataset  # noqa: E402
from ece.cluster import jaccard_similarity  # noqa: E402
from ece.explain import gradient_attribution, neuron_scores, select_neurons  # noqa: E402
from editing.context import generate_context_templates  # noqa: E402
from editing.keys import fact_token_index  # noqa: E402
from editing.layer_stats import load_corpus_text, text_chunks  # noqa: E402
from experiments.algorithms import get_algorithm  # noqa: E402
from experiments.driver import RunError, load_hparams, load_records, record_to_request, resolve_hparams_path  # noqa: E402
from util.cli import run_script, script_parser, setup_logging  # noqa: E402
from util.hooks import Trace, TraceDict  # noqa: E402
from util.io import atomic_write_json, atomic_write_png  # noqa: E402
from util.models import load_model_and_tokenizer, model_device  # noqa: E402
from util.scoring import left_padded_logits, trailing_target_log_probs  # noqa: E402
from util.tokens import chunks, prompt_ids, target_ids  # noqa: E402

LOG = logging.getLogger(__name__)

FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
ABLATIONS = ("zero", "mean")
POSITIONS = ("fact", "subject")
INPUT_DEPENDENT = ("AS", "RS", "GA", "GA_IG")
# Neuron sets whose overlap is compared: the nucleus holding a share of the score, or the top share of neurons.
SET_DEFINITIONS = (("nucleus", 0.5), ("nucleus", 0.8), ("nucleus", 0.9), ("top", 0.02), ("top", 0.05), ("top", 0.1))
REPORTED_FRACTION = 0.02  # "deleting the top 2% removes ..." (issue 14's goal)


# ----------------------------------------------------------------------------------------------- facts

def candidate_requests(data_dir, sources: Sequence[str]) -> List[dict]:
    """Requests (prompt template, subject, true target, relation) from each source, interleaved."""
    lists = []
    for source in sources:
        if source == "knowns":
            lists.append([{"prompt": r["prompt"].replace(r["subject"], "{}", 1), "subject": r["subject"],
                           "target_true": {"str": r["attribute"]}, "target_new": {"str": r["attribute"]},
                           "relation_id": r.get("relation_id"), "case_id": f"known_{r['known_id']}"}
                          for r in KnownsDataset(data_dir)])
        elif source == "mcf":
            lists.append([{**record_to_request(r), "case_id": f"mcf_{r['case_id']}"}
                          for r in load_records("mcf", data_dir, None)])
        else:
            raise RunError(f"unknown fact source {source!r}; use knowns and/or mcf")
    return [r for group in itertools.zip_longest(*lists) for r in group if r is not None]


@torch.no_grad()
def known_facts(model, tok, candidates: Sequence[dict], n_facts: int, batch_size: int = 64) -> List[dict]:
    """The first ``n_facts`` candidates whose true target's first token the model predicts first (one per
    subject and prompt)."""
    device, chosen, seen = model_device(model), [], set()
    for batch in chunks(list(candidates), batch_size):
        rows = [prompt_ids(tok, r["prompt"].format(r["subject"])) for r in batch]
        predicted = left_padded_logits(model, tok, rows, 1, device)[:, -1].argmax(-1).tolist()
        for request, top in zip(batch, predicted):
            key = (request["subject"], request["prompt"])
            if top == target_ids(tok, request["target_true"]["str"])[0] and key not in seen:
                seen.add(key)
                chosen.append(request)
        if len(chosen) >= n_facts:
            return chosen[:n_facts]
    raise RunError(f"the model knows only {len(chosen)} of the {len(candidates)} candidate facts; lower --n_facts "
                   f"to at most {len(chosen)}")


# ---------------------------------------------------------------------------------------------- scores

def all_scores(model, tok, facts, hparams, template_groups, ig_steps: int, seed: int) -> Dict[str, Dict[int, torch.Tensor]]:
    """``{order: {layer: [n_facts, d_ff]}}`` for every score, and a random order."""
    scores = {}
    for method in ("WI", "AS", "RS", "GA"):
        start = time.perf_counter()
        scores[method] = {l: s.float().cpu() for l, s in neuron_scores(
            model, tok, facts, hparams, template_groups, method).items()}
        LOG.info("%s scores in %.1f s", method, time.perf_counter() - start)
    if ig_steps > 0:
        start = time.perf_counter()
        scores["GA_IG"] = {l: s.float().cpu() for l, s in gradient_attribution(
            model, tok, facts, hparams, template_groups, hparams.layers, ig_steps).items()}
        LOG.info("GA_IG scores in %.1f s", time.perf_counter() - start)
    generator = torch.Generator().manual_seed(seed)
    width = next(iter(scores["WI"].values())).shape[1]
    scores["random"] = {l: torch.rand((len(facts), width), generator=generator) for l in hparams.layers}
    return scores


@torch.no_grad()
def mean_activations(model, tok, hparams, data_dir, n_samples: int, sample_length: int = 128) -> Dict[int, torch.Tensor]:
    """Mean input of each edited layer's rewrite module over WikiText tokens (the mean-ablation value)."""
    ids = text_chunks(tok, load_corpus_text("wikitext", data_dir), n_samples, sample_length)
    names = {l: hparams.rewrite_module(l) for l in hparams.layers}
    sums = {l: 0.0 for l in names}
    for batch in chunks(ids, 8):
        with TraceDict(model, list(names.values()), retain_input=True, retain_output=False) as traces:
            model(input_ids=batch.to(model_device(model)))
        for l, name in names.items():
            sums[l] = sums[l] + traces[name].input.float().sum((0, 1)).cpu()
    return {l: s / ids.numel() for l, s in sums.items()}


# ----------------------------------------------------------------------------------- ablation curves

def ablated_positions(tok, request, fact_token: str, positions: str) -> List[int]:
    """Token positions of the bare prompt whose rewrite-module input is ablated."""
    template, subject = request["prompt"], request["subject"]
    last = fact_token_index(tok, template, subject, fact_token)
    if positions == "fact":
        return [last]
    first = fact_token_index(tok, template, subject, "subject_first")
    return list(range(first, last + 1))


def row_plan(layer_sets, orders, fractions, ablations, positions):
    """One spec per ablated row of a fact: (positions, ablation, layer set, order, kind, fraction); kind
    ``none_kept`` is insertion at k = 0 (every neuron replaced)."""
    plan = []
    for where in positions:
        for ablation in ablations:
            for set_name in layer_sets:
                plan.append((where, ablation, set_name, None, "none_kept", 0.0))
                plan += [(where, ablation, set_name, order, kind, f) for order in orders
                         for kind in ("deletion", "insertion") for f in fractions]
    return plan


@torch.no_grad()
def fact_relative_probs(model, tok, request, ranks, plan, layer_sets, means, hparams, batch_size: int) -> tuple:
    """``(P(true | row's ablation) / P(true) for every row of plan, P(true))`` for one fact.

    ``ranks[order][layer]``: the fact's neurons in descending score order. All rows share the prompt, so a
    row's ablation is a mask over (position, neuron) with its own replacement values.
    """
    device = model_device(model)
    prompt = prompt_ids(tok, request["prompt"].format(request["subject"]))
    truth = target_ids(tok, request["target_true"]["str"])
    ids = torch.tensor(prompt + truth, device=device)
    width = next(iter(means.values())).numel()
    position_sets = {where: ablated_positions(tok, request, hparams.fact_token, where)
                     for where in {spec[0] for spec in plan}}

    def base_log_prob(n_rows: int, edits=None) -> torch.Tensor:
        with ExitStack() as stack:
            for name, edit in (edits or {}).items():
                stack.enter_context(Trace(model, name, retain_output=False, edit_input=edit))
            logits = model(input_ids=ids.expand(n_rows, -1), logits_to_keep=len(truth) + 1).logits
        log_probs, row, _ = trailing_target_log_probs(logits, [truth] * n_rows)
        return torch.zeros(n_rows, device=device).index_add_(0, row, log_probs).cpu()

    baseline = float(base_log_prob(1)[0])
    out = np.zeros(len(plan))
    for start in range(0, len(plan), batch_size):
        specs = plan[start : start + batch_size]
        edits = {}
        for layer in hparams.layers:
            ablate = torch.zeros((len(specs), len(ids), width), dtype=torch.bool)
            replacement = torch.zeros((len(specs), width))
            for r, (where, ablation, set_name, order, kind, fraction) in enumerate(specs):
                if layer not in layer_sets[set_name]:
                    continue
                k = max(1, round(fraction * width)) if kind != "none_kept" else 0
                neurons = torch.ones(width, dtype=torch.bool)
                if kind == "deletion":
                    neurons[:] = False
                    neurons[ranks[order][layer][:k]] = True
                elif kind == "insertion":
                    neurons[ranks[order][layer][:k]] = False
                ablate[r, position_sets[where]] = neurons
                if ablation == "mean":
                    replacement[r] = means[layer]
            edits[hparams.rewrite_module(layer)] = _replacer(ablate.to(device), replacement.to(device))
        out[start : start + len(specs)] = (base_log_prob(len(specs), edits) - baseline).exp().numpy()
    return out, math.exp(baseline)


def _replacer(ablate: torch.Tensor, replacement: torch.Tensor):
    def edit(x: torch.Tensor) -> torch.Tensor:
        return torch.where(ablate, replacement[:, None, :].to(x.dtype), x)
    return edit


def interval(values: np.ndarray) -> dict:
    """Mean and 95% normal interval over facts (axis 0)."""
    mean = values.mean(0)
    half = 1.96 * values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
    return {"mean": mean.tolist(), "ci_low": (mean - half).tolist(), "ci_high": (mean + half).tolist()}


def curve_area(relative: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Per fact: the curve's mean over ``log k`` (trapezoids between the fractions)."""
    x = np.log(np.asarray(fractions))
    return np.trapezoid(relative, x, axis=-1) / (x[-1] - x[0])


def summarise_curves(values: np.ndarray, plan, fractions, orders) -> dict:
    """Curves, areas and the drop at 2% for every (positions, ablation, layer set, order)."""
    index = {spec: i for i, spec in enumerate(plan)}
    result: dict = {}
    for where, ablation, set_name in dict.fromkeys((s[0], s[1], s[2]) for s in plan):
        block = result.setdefault(where, {}).setdefault(ablation, {}).setdefault(set_name, {})
        for order in orders:
            deletion = values[:, [index[(where, ablation, set_name, order, "deletion", f)] for f in fractions]]
            insertion = values[:, [index[(where, ablation, set_name, order, "insertion", f)] for f in fractions]]
            at = list(fractions).index(REPORTED_FRACTION) if REPORTED_FRACTION in fractions else None
            block[order] = {
                "deletion": interval(deletion), "insertion": interval(insertion),
                "deletion_area": interval(curve_area(deletion, fractions)),
                "insertion_area": interval(curve_area(insertion, fractions)),
                "deletion_drop_at_2pct": None if at is None else interval(1.0 - deletion[:, at]),
                "insertion_none_kept": interval(values[:, index[(where, ablation, set_name, None, "none_kept", 0.0)]]),
            }
        ranking = sorted(orders, key=lambda o: block[o]["deletion_area"]["mean"])
        block["ranking_by_deletion_area"] = ranking
        best = next(o for o in ranking if o != "random")
        best_drop, random_drop = 1 - block[best]["deletion_area"]["mean"], 1 - block["random"]["deletion_area"]["mean"]
        block["best_over_random_drop"] = best_drop / random_drop if random_drop > 0 else float("inf")
        if at is not None:  # the same at 2% of the neurons
            best_drop = block[best]["deletion_drop_at_2pct"]["mean"]
            random_drop = block["random"]["deletion_drop_at_2pct"]["mean"]
            block["best_over_random_drop_at_2pct"] = best_drop / random_drop if random_drop > 0 else float("inf")
    return result


# --------------------------------------------------------------------------------- relation structure

def spectral_labels(affinity: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    return SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                              assign_labels="cluster_qr").fit_predict(np.clip(affinity, 0, None))


def within_across(similarity: np.ndarray, relations: np.ndarray) -> tuple:
    same = relations[:, None] == relations[None, :]
    off_diagonal = ~np.eye(len(relations), dtype=bool)
    return float(similarity[same & off_diagonal].mean()), float(similarity[~same].mean())


def structure_row(similarity: np.ndarray, random_similarity: np.ndarray, relations: np.ndarray, seed: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    n_relations = len(set(relations.tolist()))
    within, across = within_across(similarity, relations)
    random_within, random_across = within_across(random_similarity, relations)
    return {
        "within": within, "across": across, "within_over_across": within / across if across > 0 else float("inf"),
        "ari": float(adjusted_rand_score(relations, spectral_labels(similarity, n_relations, seed))),
        "random_within": random_within, "random_across": random_across,
        "random_ari": float(adjusted_rand_score(relations, spectral_labels(random_similarity, n_relations, seed))),
    }


def cosine(vectors: torch.Tensor) -> np.ndarray:
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    return (unit @ unit.T).numpy()


def layer_scores(scores, method: str, layer: str, layers: Sequence[int]) -> torch.Tensor:
    """``[n_facts, width]`` scores of one edited layer, or of all of them side by side (``layer == "all"``)."""
    if layer == "all":
        return torch.cat([scores[method][l] for l in layers], dim=1)
    return scores[method][int(layer)]


def neuron_sets(matrix: torch.Tensor, kind: str, value: float) -> List[torch.Tensor]:
    """Each fact's neuron set: the nucleus holding ``value`` of its score, or its top ``value`` share."""
    if kind == "nucleus":
        return [select_neurons(row, value) for row in matrix]
    return [torch.topk(row, max(1, round(value * matrix.shape[1]))).indices for row in matrix]


def relation_structure(scores, layers, relations: np.ndarray, seed: int) -> List[dict]:
    """Within- vs across-relation similarity and ARI against relation_id, for every score, neuron-set
    definition and layer (and all edited layers, sets and vectors concatenated)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for method in [m for m in INPUT_DEPENDENT if m in scores]:
        for layer in [str(l) for l in layers] + ["all"]:
            matrix = layer_scores(scores, method, layer, layers)
            width = matrix.shape[1]
            permuted = torch.stack([row[torch.randperm(width, generator=generator)] for row in matrix])
            rows.append({"score": method, "layer": layer, "similarity": "cosine of score vectors", "set": None,
                         **structure_row(cosine(matrix), cosine(permuted), relations, seed)})
            for kind, value in SET_DEFINITIONS:
                sets = neuron_sets(matrix, kind, value)
                random_sets = [torch.randperm(width, generator=generator)[: len(s)] for s in sets]
                rows.append({"score": method, "layer": layer, "similarity": f"Jaccard of {kind} {value:g}",
                             "set": [kind, value], "mean_set_size": float(np.mean([len(s) for s in sets])),
                             **structure_row(jaccard_similarity(sets, width), jaccard_similarity(random_sets, width),
                                             relations, seed)})
    return rows


def relation_overlap_matrix(similarity: np.ndarray, relations: np.ndarray) -> tuple:
    """Mean similarity between the facts of each pair of relations with two facts or more (diagonal: distinct
    pairs within one), the relations ordered by their number of facts."""
    names = sorted((r for r in set(relations.tolist()) if (relations == r).sum() > 1),
                   key=lambda r: (-int((relations == r).sum()), r))
    matrix = np.zeros((len(names), len(names)))
    for a, ra in enumerate(names):
        for b, rb in enumerate(names):
            block = similarity[np.ix_(relations == ra, relations == rb)]
            if a == b:
                n = block.shape[0]
                matrix[a, b] = (block.sum() - np.trace(block)) / (n * (n - 1))
            else:
                matrix[a, b] = block.mean()
    return names, matrix


# -------------------------------------------------------------------------------------- output

def print_report(result: dict) -> None:
    fractions = result["fractions"]
    for where, by_ablation in result["curves"].items():
        for ablation, by_set in by_ablation.items():
            print(f"\nDeletion / insertion at the {where} position(s), {ablation} ablation "
                  f"(areas over log k from {fractions[0]:.1%} to {fractions[-1]:.0%}; 95% intervals over "
                  f"{result['n_facts']} facts)")
            print(f"{'layers':<8}{'score':<8}{'deletion area':>22}{'drop at 2%':>22}{'insertion area':>22}")
            for set_name, block in by_set.items():
                for order in block["ranking_by_deletion_area"]:
                    row = block[order]
                    cell = lambda d: f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
                    drop = row["deletion_drop_at_2pct"]
                    print(f"{set_name:<8}{order:<8}{cell(row['deletion_area']):>22}"
                          f"{cell(drop) if drop else '-':>22}{cell(row['insertion_area']):>22}")
                at_2pct = block.get("best_over_random_drop_at_2pct")
                print(f"{set_name:<8}best score's deletion drop / random's: {block['best_over_random_drop']:.2f} "
                      f"(1 - area)" + ("" if at_2pct is None else f", {at_2pct:.2f} (at 2%)"))
    print("\nRelation structure (best ARI per score; random: sets or vectors of the same sizes)")
    print(f"{'score':<7}{'layer':<6}{'similarity':<26}{'within':>8}{'across':>8}{'ARI':>7}{'rand within':>12}"
          f"{'rand across':>12}{'rand ARI':>9}")
    for method in INPUT_DEPENDENT:
        rows = [r for r in result["relation_structure"] if r["score"] == method]
        for r in sorted(rows, key=lambda r: -r["ari"])[:3]:
            print(f"{method:<7}{r['layer']:<6}{r['similarity']:<26}{r['within']:8.3f}{r['across']:8.3f}{r['ari']:7.3f}"
                  f"{r['random_within']:12.3f}{r['random_across']:12.3f}{r['random_ari']:9.3f}")


def write_plots(result: dict, overlap: tuple, folder: Path) -> List[Path]:
    """Deletion and insertion curves (all edited layers at once) and the relation x relation overlap."""
    from matplotlib.figure import Figure

    written = []
    fractions = np.asarray(result["fractions"]) * 100
    for where, by_ablation in result["curves"].items():
        fig = Figure(figsize=(5 * len(by_ablation), 7.5))
        axes = fig.subplots(2, len(by_ablation), squeeze=False)
        for column, (ablation, by_set) in enumerate(by_ablation.items()):
            block = by_set["all"]
            for row, kind in enumerate(("deletion", "insertion")):
                ax = axes[row][column]
                for order in result["orders"]:
                    curve = block[order][kind]
                    ax.plot(fractions, curve["mean"], marker="o", label=order,
                            linestyle="--" if order == "random" else "-")
                    ax.fill_between(fractions, curve["ci_low"], curve["ci_high"], alpha=0.15)
                ax.set_xscale("log")
                ax.set_xlabel("% of each edited layer's neurons " + ("ablated" if kind == "deletion" else "kept"))
                ax.set_ylabel("P(true) / P(true) unablated")
                ax.set_title(f"{kind}, {ablation} ablation, {where} position(s)")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        written.append(atomic_write_png(fig, folder / f"deletion_insertion_{where}.png"))
    names, matrix, title = overlap
    fig = Figure(figsize=(9, 8))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return written + [atomic_write_png(fig, folder / "relation_overlap.png")]


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = script_parser(__doc__, results_file=True)
    parser.add_argument("--n_facts", type=int, default=200)
    parser.add_argument("--sources", nargs="+", default=["knowns", "mcf"], help="knowns and/or mcf")
    parser.add_argument("--hparams_fname", default=None, help="ECE hparams (default <model_name>.json): layers, "
                        "module templates, fact token, context templates")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layers to score and ablate (default: the hparams' edited layers)")
    parser.add_argument("--templates", choices=("ece", "prompt"), default="ece",
                        help="score over ECE's context templates (as an edit does) or over the bare prompt only")
    parser.add_argument("--ig_steps", type=int, default=5, help="integrated-gradient steps of GA_IG (0: skip it)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--ablations", nargs="+", choices=ABLATIONS, default=list(ABLATIONS))
    parser.add_argument("--positions", nargs="+", choices=POSITIONS, default=["fact"],
                        help="fact: the subject's last token (ECE's key); subject: every subject token")
    parser.add_argument("--per_layer", action=argparse.BooleanOptionalAction, default=True,
                        help="also each edited layer alone (--no-per_layer: all edited layers at once only)")
    parser.add_argument("--mean_samples", type=int, default=32, help="WikiText chunks for the mean-ablation value")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots", default=None, help="folder for the pictures")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(args.verbose, logging.INFO)
    if any(not 0 < f < 1 for f in args.fractions):
        raise RunError(f"--fractions must lie in (0, 1), got {args.fractions}")
    fractions = sorted(args.fractions)
    torch.manual_seed(args.seed)
    algorithm = get_algorithm("ECE_AS")
    hparams = load_hparams(algorithm, resolve_hparams_path(algorithm, args.hparams_fname or f"{args.model_name}.json"))
    if args.layers:
        hparams = dataclasses.replace(hparams, layers=sorted(set(args.layers)))
    candidates = candidate_requests(args.data_dir, args.sources)  # data errors before the model loads
    model, tok = load_model_and_tokenizer(args.model_name, args.device, args.dtype)
    facts = known_facts(model, tok, candidates, args.n_facts)
    LOG.info("%d known facts (%d from known_1000)", len(facts), sum(f["case_id"].startswith("known") for f in facts))
    groups = ([["{}"]] if args.templates == "prompt"
              else generate_context_templates(model, tok, hparams.context_template_length_params, seed=args.seed))
    scores = all_scores(model, tok, facts, hparams, groups, args.ig_steps, args.seed)
    orders = list(scores)
    ranks = [{o: {l: torch.argsort(scores[o][l][j], descending=True) for l in hparams.layers} for o in orders}
             for j in range(len(facts))]
    means = mean_activations(model, tok, hparams, args.data_dir, args.mean_samples)
    layer_sets = {"all": list(hparams.layers)}
    if args.per_layer:
        layer_sets.update({str(l): [l] for l in hparams.layers})
    plan = row_plan(layer_sets, orders, fractions, args.ablations, args.positions)
    values, p_true = np.zeros((len(facts), len(plan))), []
    for j, fact in enumerate(tqdm(facts, desc=f"ablations ({len(plan)} rows per fact)", unit="fact")):
        values[j], p = fact_relative_probs(model, tok, fact, ranks[j], plan, layer_sets, means, hparams, args.batch_size)
        p_true.append(p)
    relations = np.array([f.get("relation_id") or "unknown" for f in facts])
    structure = relation_structure(scores, hparams.layers, relations, args.seed)
    result = {
        "model": args.model_name, "n_facts": len(facts), "layers": list(hparams.layers),
        "settings": {k: getattr(args, k) for k in ("sources", "templates", "ig_steps", "ablations", "positions",
                                                    "mean_samples", "seed")},
        "fractions": fractions, "orders": orders,
        "facts": [{"case_id": f["case_id"], "subject": f["subject"], "relation_id": f.get("relation_id"),
                   "p_true": p} for f, p in zip(facts, p_true)],
        "mean_p_true": float(np.mean(p_true)),
        "curves": summarise_curves(values, plan, fractions, orders),
        "relation_structure": structure,
    }
    best = max((r for r in structure if r["set"] is not None), key=lambda r: r["ari"])
    matrix = layer_scores(scores, best["score"], best["layer"], hparams.layers)
    names, matrix = relation_overlap_matrix(jaccard_similarity(neuron_sets(matrix, *best["set"]), matrix.shape[1]),
                                            relations)
    result["relation_overlap"] = {"score": best["score"], "layer": best["layer"], "similarity": best["similarity"],
                                  "relations": names, "matrix": matrix.tolist()}
    print_report(result)
    if args.plots:
        title = f"mean {best['similarity']} of {best['score']} neuron sets, layer {best['layer']}, by relation"
        for path in write_plots(result, (names, matrix, title), Path(args.plots)):
            print(f"plot: {path}")
    if args.out:
        atomic_write_json(Path(args.out), result, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))
