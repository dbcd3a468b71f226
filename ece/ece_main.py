"""ECE (explain, cluster, batch-optimise, restricted update): ECE's part of the shared editing round.

The round itself (statistics, templates, target values, layer loop, sequential state) is
``editing.round.locate_and_edit``; ``ECERound`` gives it steps 1-2 (``plan_loops``), the restricted solve
of step 4 (``make_solver``) and step 5 (``refine``), and writes the round's explanation.

1. Explain: score every neuron of an edited layer for every request (``ece.explain``); the round's
   neuron set ``S(l)`` is the nucleus of the scores summed over the requests. By default
   (``score_layers_after_update``) layer ``l`` is scored inside the layer loop of step 4, just before its
   solve, on the model whose earlier layers already carry this round's update, as upstream ECE-AS/RS do
   (AS_main.py:113-125); AS and RS score the loop's own keys. Otherwise every layer is scored up front.
2. Cluster: requests whose own neuron sets at the first edited layer overlap are grouped
   (``ece.cluster``); those scores are taken before any update, where the first layer's in-loop scores
   would be taken too. ``cluster_by`` replaces the grouping with a control (relation, shuffled, single).
3. Batch-optimise: one target-value loop per cluster (``editing.target_values``, shared with MEMIT).
4. Update: MEMIT's layer loop (``editing.update``) with the solve restricted to the columns ``S(l)``:
   ``Delta[:, S] = R K_S^T (lambda C0[S,S] + C_prev[S,S] + K_S K_S^T)^{-1}``, other columns untouched
   (AS_main.py:169-184). ``C_prev += K K^T`` over all neurons afterwards (``editing.sequential``).
5. Optional refinement: re-run the layer loop for requests whose remaining error is in (alpha, upper_bound),
   with the sets ``S(l)`` decided in the main pass (upstream has no refinement to follow).

With ``neuron_threshold = 1.0`` every neuron is selected, all requests fall in one cluster, and the
round is exactly MEMIT_seq with one target loop for the round.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ece.cluster import (cluster_requests, jaccard_similarity, optimisation_loops, relation_clusters,
                         shuffled_clusters)
from ece.explain import SCORE_METHODS, neuron_scores, scores_from_keys, select_neurons
from ece.hparams import ECEHyperParams
from editing.context import EditContext
from editing.keys import states_at_fact_tokens
from editing.round import EditReport, locate_and_edit, timed
from editing.sequential import SequentialState
from editing.target_values import TargetValues, default_requests_per_loop, step_widths
from editing.update import Solver, least_squares_delta, spread_update_over_layers

LOG = logging.getLogger(__name__)

TOP_NEURONS_PER_LAYER = 20
TOP_NEURONS_PER_REQUEST = 10

__all__ = ["SCORE_METHODS", "apply_ece_to_model", "restricted_solver"]


# score(layer, keys [n, d_in]) -> scores [n, d_in], on the model as it stands when the layer is solved
LayerScorer = Callable[[int, torch.Tensor], torch.Tensor]


class NeuronSelection:
    """The neuron set ``S(l)`` of each edited layer and the per-request scores it came from.

    A layer's set is decided once: from ``scores`` given up front, or else by ``score`` the first time the
    layer loop asks for it (``columns``), just before the layer's solve. Later asks (refinement passes)
    get the same set back.
    """

    def __init__(self, threshold: float, score: Optional[LayerScorer] = None,
                 scores: Optional[Dict[int, torch.Tensor]] = None):
        self.threshold = threshold
        self.score = score
        self.scores: Dict[int, torch.Tensor] = {}  # layer -> [n_requests, d_in], CPU
        self.round_scores: Dict[int, torch.Tensor] = {}  # layer -> [d_in], summed over the requests
        self.selected: Dict[int, torch.Tensor] = {}  # layer -> ascending neuron indices
        self.seconds: Dict[str, float] = {}  # time spent scoring inside the layer loop
        for layer, layer_scores in (scores or {}).items():
            self._decide(layer, layer_scores)

    def _decide(self, layer: int, scores: torch.Tensor) -> None:
        self.scores[layer] = scores.cpu()
        self.round_scores[layer] = self.scores[layer].sum(0)
        self.selected[layer] = select_neurons(self.round_scores[layer], self.threshold)

    def columns(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """``S(layer)``; ``keys`` ``[d_in, n]`` are the layer loop's, used only if the layer is still unscored."""
        if layer not in self.selected:
            if self.score is None:
                raise KeyError(f"no neuron selection for layer {layer} and no scorer to make one")
            with timed(self.seconds, "explain"):
                self._decide(layer, self.score(layer, keys.T))
        return self.selected[layer]


def in_loop_scorer(model, tok, requests, hparams, template_groups, method: str) -> LayerScorer:
    """Scores of one layer over ``requests`` on the model as it stands: AS and RS from the keys the loop
    solves with (upstream scores ``layer_ks`` of its solve, AS_main.py:116-121), GA by its own backward."""
    def score(layer: int, keys: torch.Tensor) -> torch.Tensor:
        if method in ("AS", "RS"):
            return scores_from_keys(model, hparams, layer, keys, method)
        return neuron_scores(model, tok, requests, hparams, template_groups, method, layers=[layer])[layer]

    return score


def restricted_solver(hparams, second_moments, state: Optional[SequentialState],
                      selection: NeuronSelection) -> Solver:
    """MEMIT's solve over the columns ``S(layer)`` only; the full solve when all are selected."""
    def solve(layer, keys, residuals):
        columns = selection.columns(layer, keys)
        prev = state.prev_moment(layer) if state is not None else None
        c0 = second_moments[layer]
        if len(columns) == keys.shape[0]:
            return least_squares_delta(keys, residuals, c0, hparams.mom2_update_weight, prev)
        sub = lambda m: m[columns.to(m.device)][:, columns.to(m.device)]
        partial = least_squares_delta(keys[columns.to(keys.device)], residuals, sub(c0), hparams.mom2_update_weight,
                                      sub(prev) if prev is not None else None)
        delta = torch.zeros((residuals.shape[0], keys.shape[0]), dtype=partial.dtype, device=partial.device)
        delta[:, columns.to(partial.device)] = partial
        return delta

    return solve


def loop_size(model, hparams: ECEHyperParams) -> Optional[int]:
    """Most requests per target loop: ``z_batch_size``, else the device's best size for independent
    deltas (splitting a cluster changes nothing then); a shared delta keeps its cluster whole."""
    if hparams.z_batch_size is not None or hparams.z_mode == "shared":
        return hparams.z_batch_size
    return default_requests_per_loop(model)


def remaining_errors(model, tok, requests, hparams, targets: torch.Tensor) -> torch.Tensor:
    """``||z_j - h_j||`` at the last edited layer on the bare prompt, on the model as it now stands."""
    z_module = hparams.layer_module(hparams.layers[-1])
    _, outputs = states_at_fact_tokens(model, tok, [r["prompt"] for r in requests], [r["subject"] for r in requests],
                                       hparams.fact_token, outputs_of=[z_module])
    current = outputs[z_module].float()
    return (targets.to(current.device) - current).norm(dim=1).cpu()


class ECERound:
    """ECE's part of the shared round (``editing.round.locate_and_edit``): explain and cluster before the
    target values, the solve restricted to ``S(l)``, the refinement passes; it keeps what the round's
    explanation reports."""

    def __init__(self, model, tok, requests, hparams: ECEHyperParams, method: str, seed: int):
        self.model, self.tok, self.requests, self.hparams = model, tok, requests, hparams
        self.method, self.seed = method, seed
        # WI depends neither on the requests nor on the earlier layers' weights: scoring it in the loop would
        # give the same sets.
        self.scored_in_loop = hparams.score_layers_after_update and method != "WI"
        self.selection: Optional[NeuronSelection] = None
        self.own_sets: List[torch.Tensor] = []  # each request's own set at the first edited layer
        self.labels = np.zeros(0, dtype=int)  # cluster of each request
        self.loops: List[List[int]] = []
        # Grouped by relation: known (or refused) before anything is computed.
        self.relation_labels = relation_clusters(requests) if hparams.cluster_by == "relation" else None
        self.values: Optional[TargetValues] = None
        self.errors: Optional[torch.Tensor] = None  # remaining error of each request after the last pass
        self.refinements: List[dict] = []

    def plan_loops(self, template_groups, seconds: Dict[str, float]) -> List[List[int]]:
        """Explain, then cluster: one target loop per cluster, split to ``loop_size``."""
        model, tok, requests, hparams, method = self.model, self.tok, self.requests, self.hparams, self.method
        layers, threshold = hparams.layers, hparams.neuron_threshold
        with timed(seconds, "explain"):
            # Scored in the loop, only the first layer is needed now (clustering); no earlier layer of
            # the round is updated when it is solved, so these scores are its in-loop scores as well.
            up_front = layers[:1] if self.scored_in_loop else layers
            scores = neuron_scores(model, tok, requests, hparams, template_groups, method, layers=up_front)
            scorer = None
            if self.scored_in_loop:
                scorer = in_loop_scorer(model, tok, requests, hparams, template_groups, method)
            self.selection = NeuronSelection(threshold, scorer, scores={l: s.cpu() for l, s in scores.items()})
            first = self.selection.scores[layers[0]]
            self.own_sets = [select_neurons(row, threshold) for row in first]
        with timed(seconds, "cluster"):
            self.labels = self.cluster_labels(width=first.shape[1])
            widths = None if hparams.z_mode == "shared" else step_widths(tok, requests, hparams.fact_token)
            self.loops = optimisation_loops(self.labels, loop_size(model, hparams), widths)
        LOG.info("ECE_%s: %d requests in %d clusters (%d loops); layers scored %s", method, len(requests),
                 int(self.labels.max()) + 1 if len(self.labels) else 0, len(self.loops),
                 "in the layer loop, after the earlier layers' update" if self.scored_in_loop else "before the update")
        return self.loops

    def cluster_labels(self, width: int) -> np.ndarray:
        """Each request's cluster, by ``cluster_by``: neuron overlap (spectral), or a control."""
        hparams, n = self.hparams, len(self.requests)
        if hparams.cluster_by == "relation":
            return self.relation_labels
        if hparams.cluster_by == "single":
            return np.zeros(n, dtype=int)
        labels = cluster_requests(self.own_sets, hparams.n_clusters, hparams.max_clusters, seed=self.seed, width=width)
        return shuffled_clusters(labels, self.seed) if hparams.cluster_by == "shuffled" else labels

    def make_solver(self, hparams, second_moments, state: Optional[SequentialState]) -> Solver:
        return restricted_solver(hparams, second_moments, state, self.selection)

    def refine(self, values: TargetValues, solve: Solver, template_groups) -> None:
        """Re-run the layer loop for the requests whose remaining error lies in (alpha, upper_bound), with
        the sets of the main pass, up to ``max_iterations`` passes in all; keeps the target values and the
        remaining errors for the explanation."""
        model, tok, requests, hparams = self.model, self.tok, self.requests, self.hparams
        self.values = values
        errors = remaining_errors(model, tok, requests, hparams, values.targets)
        for iteration in range(2, hparams.max_iterations + 1):
            upper = hparams.upper_bound if hparams.upper_bound is not None else float("inf")
            chosen = [i for i, e in enumerate(errors.tolist()) if hparams.alpha < e < upper]
            if not chosen:
                break
            spread_update_over_layers(model, tok, [requests[i] for i in chosen], hparams, values.targets[chosen],
                                      template_groups, solve)
            errors = remaining_errors(model, tok, requests, hparams, values.targets)
            self.refinements.append({"iteration": iteration, "case_ids": [requests[i].get("case_id") for i in chosen]})
        self.errors = errors

    def explanation(self, seconds: Dict[str, float]) -> dict:
        """Which neurons were edited (the sets the solves used, and the scores they came from), and which
        facts were optimised together."""
        hparams, requests, values, labels = self.hparams, self.requests, self.values, self.labels
        scores, round_scores = self.selection.scores, self.selection.round_scores
        selected = self.selection.selected
        layers = {}
        for l in hparams.layers:
            mass = round_scores[l]
            total = float(mass.sum()) or 1.0
            layers[str(l)] = {
                "n_neurons": len(mass), "n_selected": len(selected[l]), "selected_neurons": selected[l].tolist(),
                "mass_share": float(mass[selected[l]].sum()) / total,
                "top_neurons": [{"neuron": i, "share": float(mass[i]) / total}
                                for i in _top(mass, TOP_NEURONS_PER_LAYER)],
            }
        similarity = jaccard_similarity(self.own_sets, width=len(round_scores[hparams.layers[0]]))
        clusters = []
        for label in sorted(set(labels.tolist())):
            members = np.flatnonzero(labels == label)
            block = similarity[np.ix_(members, members)]
            pairs = len(members) * (len(members) - 1)
            cluster = {
                "cluster": int(label), "size": len(members),
                "case_ids": [requests[i].get("case_id") for i in members],
                "mean_jaccard": float((block.sum() - len(members)) / pairs) if pairs else 1.0,
                "loops": sum(1 for loop in self.loops if loop[0] in members),
            }
            relations = Counter(str(requests[i]["relation_id"]) for i in members
                                if requests[i].get("relation_id") is not None)
            if relations:  # how far the cluster follows CounterFact's relations
                cluster["relations"] = dict(relations.most_common())
            clusters.append(cluster)
        per_request = []
        for j, request in enumerate(requests):
            per_request.append({
                "case_id": request.get("case_id"), "subject": request["subject"],
                "prompt": request["prompt"], "target_new": request["target_new"]["str"],
                "cluster": int(labels[j]), "loop": values.loop_of[j],
                "n_own_neurons_first_layer": len(self.own_sets[j]),
                "top_neurons": {str(l): _top(scores[l][j], TOP_NEURONS_PER_REQUEST) for l in hparams.layers},
                "target_steps": values.steps[j], "target_loss": values.losses[j],
                "remaining_error": float(self.errors[j]),
            })
        return {
            "method": f"ECE_{self.method}", "neuron_threshold": hparams.neuron_threshold, "z_mode": hparams.z_mode,
            "cluster_by": hparams.cluster_by,
            "scored_after_update": self.scored_in_loop,
            "n_requests": len(requests), "n_clusters": len(clusters), "n_loops": len(self.loops),
            "seconds": seconds, "layers": layers, "clusters": clusters, "requests": per_request,
            "refinement": self.refinements,
        }


def check_ece_requests(requests: Sequence[dict], hparams: ECEHyperParams) -> None:
    """What ECE needs of the requests before a round: a ``relation_id`` each when clustering by relation."""
    if hparams.cluster_by == "relation":
        relation_clusters(requests)


def apply_ece_to_model(
    model, tok, requests, hparams: ECEHyperParams, context: EditContext,
    state: Optional[SequentialState] = None, method: str = "WI",
) -> EditReport:
    """Edit ``model`` in place with ECE using neuron score ``method``; the report carries the explanation."""
    ece = ECERound(model, tok, requests, hparams, method, seed=context.seed)
    report = locate_and_edit(model, tok, requests, hparams, context, state, make_solver=ece.make_solver,
                             plan_loops=ece.plan_loops, shared_delta=hparams.z_mode == "shared", refine=ece.refine)
    # Scoring inside the layer loop is explaining, not updating: keep the stages disjoint.
    in_loop = ece.selection.seconds.get("explain", 0.0)
    report.seconds["update"] -= in_loop
    report.seconds["explain"] += in_loop
    selected = ece.selection.selected
    LOG.info("ECE_%s: neurons selected per layer %s", method, {l: len(s) for l, s in selected.items()})
    report.extra = {"neuron_score": method, "n_clusters": int(ece.labels.max()) + 1,
                    "selected_neurons": {str(l): len(s) for l, s in selected.items()}}
    report.explanation = ece.explanation(report.seconds)
    return report


def _top(scores: torch.Tensor, count: int) -> List[int]:
    return torch.topk(scores, min(count, len(scores))).indices.tolist()
