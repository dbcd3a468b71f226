"""The driver and the editing methods end to end, with real CounterFact records.

The driver's bookkeeping (which model state each stage measures, resuming an interrupted run, the last-round
step, the downstream schedule) is checked on the tiny Llama with a stand-in edit, in seconds. The methods
run on the embedded model (SmolLM2-135M); those tests are marked ``slow``."""
import copy
import dataclasses
import json

import pytest
import torch

import summarize
from experiments import evaluate
from experiments.driver import RunError, record_to_request
from util.paths import REPO_ROOT

SHIPPED = REPO_ROOT / "hparams"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data_dir):
    """Results and statistics folders shared by this module's runs, hparams tuned only for test speed:
    fewer statistics samples, and every request's target value in one loop (the same values as one
    loop per request, see test_editing_math)."""
    root = tmp_path_factory.mktemp("integration")
    memit = json.loads((SHIPPED / "MEMIT" / "smollm2-135m.json").read_text())
    memit.update(mom2_n_samples=400, z_requests_per_loop=10)
    (root / "memit.json").write_text(json.dumps(memit))
    rome = json.loads((SHIPPED / "ROME" / "smollm2-135m.json").read_text())
    rome.update(mom2_n_samples=400)
    (root / "rome.json").write_text(json.dumps(rome))
    env = {"ECE_RESULTS_DIR": str(root / "results"), "ECE_STATS_DIR": str(root / "stats"),
           "ECE_DATA_DIR": str(data_dir)}
    return root, env


@pytest.fixture
def env(workspace, monkeypatch):
    root, values = workspace
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return root


def run(*argv):
    return evaluate.main([*argv, "--model_name", "smollm2-135m", "--ds_name", "mcf", "--device", "cpu",
                          "--skip_generation_tests"])


def cases(run_dir):
    return {p.name: json.loads(p.read_text()) for p in sorted(run_dir.glob("*_edits-case_*.json"))}


# -- The driver's bookkeeping, on the tiny Llama with a stand-in edit ------------------------------------

@pytest.fixture
def tiny_run(tmp_path, monkeypatch, data_dir, tiny_llama, tiny_tok, make_hparams):
    """``tiny_run(*argv)``: a sequential MEMIT run of the driver on real CounterFact records, loading a fresh
    copy of the tiny Llama each time (as a new process loads the unedited model), with MEMIT hparams for its
    layers 1 and 2. Pair it with ``StandIn``, so that no statistics or target values are computed."""
    monkeypatch.setenv("ECE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("ECE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ECE_STATS_DIR", str(tmp_path / "stats"))
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a, **k: (copy.deepcopy(tiny_llama), tiny_tok))
    hparams_file = tmp_path / "tiny_memit.json"
    hparams_file.write_text(json.dumps(make_hparams("llama").to_dict()))

    def run_tiny(*argv):
        return evaluate.main(["--alg_name", "MEMIT", "--sequential", "--hparams_fname", str(hparams_file),
                              "--model_name", "tiny-llama", "--ds_name", "mcf", "--device", "cpu",
                              "--skip_generation_tests", *argv])

    return run_tiny


class StandIn:
    """MEMIT's registry entry (a sequential state without C_prev) with a cheap edit of known effect in place of
    MEMIT's, installed as the driver's ``get_algorithm``. The edit depends on everything a resumed run must
    restore: the weights (it shrinks the first edited layer's), the state (by a factor that depends on the edits
    made so far) and the driver's per-round seed (it adds a random rank-one change from the global generator).
    ``applied`` lists each round's case ids; ``crash_at`` interrupts the n-th edit (1-based) of a run;
    ``finish`` (optional) becomes the step after the last round, PRUNE's slot."""

    def __init__(self, monkeypatch, finish=None):
        self.applied, self.crash_at, self.finished, self._finish_step = [], None, 0, finish
        memit = evaluate.get_algorithm("MEMIT")
        extra = {} if finish is None else {"finish": self._finish}
        self.algorithm = dataclasses.replace(memit, apply=self._apply, **extra)
        monkeypatch.setattr(evaluate, "get_algorithm", lambda name: self.algorithm)

    def _apply(self, model, tok, requests, hparams, context, state):
        from editing.round import EditReport
        from util.weights import add_to_weight, read_weight

        if self.crash_at is not None:
            self.crash_at -= 1
            if self.crash_at == 0:
                raise KeyboardInterrupt
        name = hparams.rewrite_module(hparams.layers[0])
        weight = read_weight(model, name)
        rank_one = torch.randn(weight.shape[0], 1) @ torch.randn(1, weight.shape[1])
        add_to_weight(model, name, -weight / (2 + state.edits) + 0.05 * rank_one)
        state.absorb_round(model, tok, requests, hparams, None)
        self.applied.append([r["case_id"] for r in requests])
        return EditReport()

    def _finish(self, model, hparams, state):
        self.finished += 1
        return self._finish_step(model, hparams, state)


def halve_first_layer(model, hparams, state):
    from util.weights import add_to_weight, read_weight

    name = hparams.rewrite_module(hparams.layers[0])
    add_to_weight(model, name, -0.5 * read_weight(model, name))
    return {"halved": name}


def latest_run(run_dir):
    return sorted(run_dir.parent.glob("run_*"))[-1]


def measured(case: dict) -> dict:
    """A case file without its wall-clock times."""
    case = copy.deepcopy(case)
    case.pop("time")
    case["edit_report"].pop("seconds")
    return case


def files_of(run_dir) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def assert_same_state_file(a, b):
    first, second = (torch.load(d / "sequential_state.pt", weights_only=True) for d in (a, b))
    assert first["rounds_done"] == second["rounds_done"]
    assert first["weights"].keys() == second["weights"].keys()
    assert all(torch.equal(first["weights"][k], second["weights"][k]) for k in first["weights"])
    assert first["state"] == second["state"]


def test_interrupted_sequential_run_resumes_to_the_same_results(tiny_run, monkeypatch):
    """Interrupted in the second of three rounds, a sequential run resumes after the last finished round: no
    case lost or edited twice, the edited weights and the method's state restored, and every case file and the
    saved state end as in an uninterrupted run. A resume with a changed setting is refused and touches nothing."""
    stand_in = StandIn(monkeypatch)
    args = ("--dataset_size_limit", "3", "--num_edits", "1")
    reference = tiny_run(*args)
    rounds = stand_in.applied
    assert len(rounds) == 3 and sorted(sum(rounds, [])) == sorted(c["case_id"] for c in cases(reference).values())

    stand_in.applied, stand_in.crash_at = [], 2
    with pytest.raises(KeyboardInterrupt):
        tiny_run(*args)
    interrupted = latest_run(reference)
    assert interrupted != reference and stand_in.applied == rounds[:1]
    # The first round's case is on disk, nothing else; so is the state after it.
    assert list(cases(interrupted)) == [f"1_edits-case_{rounds[0][0]}.json"]
    saved = torch.load(interrupted / "sequential_state.pt", weights_only=True)
    assert saved["rounds_done"] == 1 and saved["state"]["rounds"] == 1 and saved["state"]["edits"] == 1
    # MEMIT --sequential is AlphaEdit's plain MEMIT row: the edits are kept, C_prev never is.
    assert saved["state"]["prev_moments"] == {} and saved["state"]["track_prev_moments"] is False

    on_disk = files_of(interrupted)
    with pytest.raises(RunError, match="seed"):
        tiny_run(*args, "--continue_from_run", interrupted.name, "--seed", "1")
    assert files_of(interrupted) == on_disk and latest_run(reference) == interrupted

    stand_in.applied, stand_in.crash_at = [], None
    resumed = tiny_run(*args, "--continue_from_run", interrupted.name)
    assert resumed == interrupted
    assert stand_in.applied == rounds[1:]  # the rounds not done, once each, in order
    expected = cases(reference)
    assert cases(resumed).keys() == expected.keys()
    for name, case in cases(resumed).items():
        assert measured(case) == measured(expected[name]), name
    assert_same_state_file(resumed, reference)


def test_run_interrupted_in_the_final_evaluation_keeps_its_last_round_step_and_measured_cases(
        tiny_run, monkeypatch):
    """The step after the last round (PRUNE's restraint; here halving a layer) runs once: a run interrupted in
    its final evaluation resumes with the saved result of that step, measures only the cases whose final
    metrics are missing, and ends as an uninterrupted run."""
    stand_in = StandIn(monkeypatch, finish=halve_first_layer)
    monkeypatch.setattr(evaluate, "FINAL_EVALUATION_GROUP", 1)  # each final measurement saved on its own
    args = ("--dataset_size_limit", "3", "--num_edits", "1")
    reference = tiny_run(*args)
    assert stand_in.finished == 1

    real_evaluator = evaluate.Evaluator
    measurements = []

    class Counting(real_evaluator):
        crash_at = None

        def many(self, model, tok, records, stage=None, **kwargs):
            for record in records:
                measurements.append(record["case_id"])
                if len(measurements) == Counting.crash_at:
                    raise KeyboardInterrupt
            return super().many(model, tok, records, stage, **kwargs)

    monkeypatch.setattr(evaluate, "Evaluator", Counting)
    Counting.crash_at = 2 * 3 + 2  # pre and post of three cases, then the second final measurement
    with pytest.raises(KeyboardInterrupt):
        tiny_run(*args)
    interrupted = latest_run(reference)
    assert stand_in.finished == 2
    with_final = sorted(name for name, case in cases(interrupted).items() if "final" in case)
    assert len(with_final) == 1
    first_final = (interrupted / with_final[0]).read_bytes()
    assert torch.load(interrupted / "sequential_state.pt", weights_only=True)["state"]["finished"] is True

    measurements.clear()
    Counting.crash_at = None
    resumed = tiny_run(*args, "--continue_from_run", interrupted.name)
    assert stand_in.finished == 2  # not repeated on the restored weights
    assert len(measurements) == 2 and (interrupted / with_final[0]).read_bytes() == first_final
    expected = cases(reference)
    assert cases(resumed).keys() == expected.keys()
    for name, case in cases(resumed).items():
        assert measured(case) == measured(expected[name]), name
    assert_same_state_file(resumed, reference)


def test_sequential_protocol_and_downstream_schedule(tiny_run, monkeypatch, tiny_llama, tiny_tok):
    """Pre on the unedited model, post after each round, final after the last; downstream checks before
    round 1 and after each round, with the number of edits made."""
    from util.scoring import mean_nlls

    stand_in = StandIn(monkeypatch)
    run_dir = tiny_run("--dataset_size_limit", "2", "--num_edits", "1", "--downstream_eval_steps", "1",
                       "--downstream_examples", "2")
    assert len(stand_in.applied) == 2
    first, second = [c for _, c in sorted(cases(run_dir).items())]
    nll = lambda case, stage: case[stage]["rewrite_prompts_probs"][0]["target_true"]
    # The first case's post state (one edit) differs from the final state (two edits); the second
    # case's pre was measured after round 1 but on the unedited weights.
    assert nll(first, "post") != pytest.approx(nll(first, "final"), abs=1e-4)
    assert nll(second, "post") == pytest.approx(nll(second, "final"), abs=1e-5)
    assert nll(first, "pre") != pytest.approx(nll(first, "post"), abs=1e-4)
    rewrite = second["requested_rewrite"]
    (unedited,) = mean_nlls(tiny_llama, tiny_tok, [rewrite["prompt"].format(rewrite["subject"])],
                            [rewrite["target_true"]["str"]])
    assert nll(second, "pre") == pytest.approx(unedited, abs=1e-4)
    assert nll(second, "pre") != pytest.approx(nll(second, "post"), abs=1e-4)
    glue = sorted(p.name for p in (run_dir / "glue_eval").glob("*.json"))
    assert glue == ["edits_000000.json", "edits_000001.json", "edits_000002.json"]
    counts = [json.loads((run_dir / "glue_eval" / g).read_text())["edit_count"] for g in glue]
    assert counts == [0, 1, 2]

    # Curve points at the same checkpoints: the edits so far scored on the model of that moment (the final
    # evaluation stands in after the last round), perplexity and the accumulated edit.
    from experiments.curves import load_curve

    curve = load_curve(run_dir)
    assert [p["edit_count"] for p in curve] == [0, 1, 2]
    assert curve[0]["edits_so_far"] is None and curve[2]["edits_so_far"] is None
    assert curve[1]["edits_so_far"]["n_cases"] == 1
    first_at_one = curve[1]["edits_so_far"]["efficacy"]["mean"]
    assert first_at_one == 100.0 * (nll(first, "post") > first["post"]["rewrite_prompts_probs"][0]["target_new"])
    assert curve[0]["perplexity_edited"] == pytest.approx(curve[0]["perplexity_unedited"], rel=1e-6)
    assert all(v == 0 for v in curve[0]["edit_norm"].values())
    assert curve[1]["perplexity_edited"] != pytest.approx(curve[1]["perplexity_unedited"], rel=1e-4)
    assert curve[1]["perplexity_unedited"] == pytest.approx(curve[0]["perplexity_unedited"], rel=1e-6)
    (layer,) = [name for name, norm in curve[1]["edit_norm"].items() if norm > 0]  # the stand-in edits one
    assert curve[2]["edit_norm"][layer] > 0
    assert curve[1]["edit_spectral_norm"][layer] <= curve[1]["edit_norm"][layer] + 1e-9


def test_progress_lines_and_stage_times_accumulate_over_a_resume(tiny_run, monkeypatch, caplog, tmp_path):
    """Each round logs how far the run is; timing.json holds the seconds of every stage, and a resumed
    run adds its own to those the interrupted one measured."""
    stand_in = StandIn(monkeypatch)
    stand_in.crash_at = 3
    args = ("--dataset_size_limit", "3", "--num_edits", "1", "--downstream_eval_steps", "2",
            "--downstream_examples", "2")
    with caplog.at_level("INFO", logger="evaluate"), pytest.raises(KeyboardInterrupt):
        tiny_run(*args)
    (run_dir,) = (tmp_path / "results" / "MEMIT").glob("run_*")
    lines = [r.getMessage() for r in caplog.records if " done: " in r.getMessage()]
    assert [line.split(";")[0] for line in lines] == ["round 1/3 done: 1/3 edits", "round 2/3 done: 2/3 edits"]
    assert all(line.endswith(" left") for line in lines)
    before = json.loads((run_dir / "timing.json").read_text())["seconds"]
    assert set(before) == {"pre", "edit", "post", "downstream", "curves", "final"}
    assert before["downstream"] > 0 and before["pre"] > 0 and before["post"] > 0 and before["final"] == 0
    assert before["curves"] > 0

    stand_in.crash_at = None
    caplog.clear()
    with caplog.at_level("INFO", logger="evaluate"):
        tiny_run(*args, "--continue_from_run", run_dir.name)
    after = json.loads((run_dir / "timing.json").read_text())["seconds"]
    assert all(after[stage] >= before[stage] for stage in before)
    assert after["pre"] > before["pre"] and after["final"] > 0
    assert [r.getMessage().split(";")[0] for r in caplog.records if " done: " in r.getMessage()] == [
        "round 3/3 done: 3/3 edits"]


# -- The methods on the embedded model -------------------------------------------------------------------

@pytest.mark.slow
def test_memit_edits_ten_real_records(env):
    run_dir = run("--alg_name", "MEMIT", "--hparams_fname", str(env / "memit.json"),
                  "--dataset_size_limit", "10", "--num_edits", "10")
    files = cases(run_dir)
    assert len(files) == 10
    assert all(c["grouped_case_ids"] == files[next(iter(files))]["grouped_case_ids"] for c in files.values())
    params = json.loads((run_dir / "params.json").read_text())
    assert params["hparams"]["mom2_n_samples"] == 400 and (run_dir / "hparams.json").exists()
    (row,) = summarize.summarize("MEMIT", runs=[run_dir.name], results_dir=run_dir.parent.parent)
    post, pre = row["stages"]["post"], row["stages"]["pre"]
    assert post["efficacy"]["mean"] >= 90.0, post
    assert pre["efficacy"]["mean"] <= 50.0  # the counterfactual targets were not believed before
    assert post["generalization"]["mean"] > pre["generalization"]["mean"]


@pytest.mark.slow
def test_rome_flips_one_record(env, embedded_model_and_tok, data_dir):
    """ROME on a fact the model knows (Porsche 911, created by Porsche -> Honda)."""
    from dsets import CounterFactDataset
    from editing.context import EditContext
    from rome.rome_main import ROMEHyperParams, apply_rome_to_model
    from util.scoring import mean_nlls
    from util.weights import load_weights, snapshot_weights

    model, tok = embedded_model_and_tok
    record = CounterFactDataset(data_dir, multi=True, size=2)[1]
    request = {"case_id": record["case_id"], **record["requested_rewrite"]}
    assert request["subject"] == "Porsche 911"
    hparams = ROMEHyperParams.from_json(env / "rome.json")
    prompt = request["prompt"].format(request["subject"])
    targets = [request["target_new"]["str"], request["target_true"]["str"]]
    before = mean_nlls(model, tok, [prompt, prompt], targets)
    original = snapshot_weights(model, [hparams.rewrite_module(hparams.layers[0])])
    try:
        apply_rome_to_model(model, tok, [request], hparams, EditContext("smollm2-135m"))
        after = mean_nlls(model, tok, [prompt, prompt], targets)
        paraphrase = record["paraphrase_prompts"][0]
        after_paraphrase = mean_nlls(model, tok, [paraphrase, paraphrase], targets)
    finally:
        load_weights(model, original)
    assert before[0] > before[1]  # believed Porsche before
    assert after[0] < after[1]  # Honda after
    assert after_paraphrase[0] < before[0]


@pytest.mark.slow
def test_context_templates_are_sensible_text(embedded_model_and_tok):
    """Upstream's generator produced 'The-, the the--,, a. {}' (a sliced attention mask with left padding)."""
    import re

    from editing.context import generate_context_templates

    model, tok = embedded_model_and_tok
    groups = generate_context_templates(model, tok, [[10, 5]], seed=0)
    assert groups[0] == ["{}"] and len(groups[1]) == 5
    for template in groups[1]:
        assert template.endswith(". {}") and template.count("{}") == 1
        text = template[: -len(". {}")]
        words = re.findall(r"[A-Za-z']+", text)
        assert len(words) >= 5, template
        assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8, template
        assert "--" not in text and ",," not in text, template


def ece_test_hparams(method):
    """Shipped ECE hparams with, for the suite's time budget, 12 target steps over 3 context templates
    (shipped: 25 over 6; the README's measurements use the shipped files) and 400 statistics samples."""
    folder = evaluate.get_algorithm(f"ECE_{method}").hparams_dir_name
    hparams = json.loads((SHIPPED / folder / "smollm2-135m.json").read_text())
    hparams.update(mom2_n_samples=400, v_num_grad_steps=12, context_template_length_params=[[10, 2]])
    return hparams


def check_explanation(explanation: dict, round_ids: set, hparams: dict) -> None:
    assert {r["case_id"] for r in explanation["requests"]} == round_ids
    assert sorted(i for c in explanation["clusters"] for i in c["case_ids"]) == sorted(round_ids)
    for layer in map(str, hparams["layers"]):
        info = explanation["layers"][layer]
        assert 0 < info["n_selected"] == len(info["selected_neurons"]) <= info["n_neurons"] == 1536
        assert info["mass_share"] >= hparams["neuron_threshold"] - 1e-6
    assert set(explanation["seconds"]) >= {"explain", "cluster", "target_values", "update"}
    assert all(0 <= r["cluster"] < explanation["n_clusters"] for r in explanation["requests"])


@pytest.mark.slow
def test_ece_wi_driver_two_sequential_rounds_of_ten_real_edits(env):
    """Through the driver: 20 case files, efficacy >= 90% after each round, and an explanation file per
    round that says which neurons were edited and which facts were optimised together."""
    hparams = ece_test_hparams("WI")
    path = env / "ece_wi.json"
    path.write_text(json.dumps(hparams))
    run_dir = run("--alg_name", "ECE_WI", "--hparams_fname", str(path), "--dataset_size_limit", "20",
                  "--num_edits", "10", "--skip_final_eval")
    files = cases(run_dir)
    assert len(files) == 20 and json.loads((run_dir / "params.json").read_text())["sequential"]
    (row,) = summarize.summarize("ECE_WI", runs=[run_dir.name], results_dir=run_dir.parent.parent)
    assert row["stages"]["post"]["efficacy"]["mean"] >= 90.0, row["stages"]["post"]
    explanations = sorted(run_dir.glob("explanation_round_*.json"))
    assert [p.name for p in explanations] == ["explanation_round_000.json", "explanation_round_001.json"]
    for index, path in enumerate(explanations):
        round_ids = {c["case_id"] for c in files.values() if c["round"] == index}
        check_explanation(json.loads(path.read_text()), round_ids, hparams)


@pytest.mark.slow
def test_ece_ga_one_round_of_ten_real_edits(env, embedded_model_and_tok, data_dir):
    """Another neuron score than the driver test's WI, in process: GA (gradient times activation, which the
    upstream release lacks). One round of 10 real edits reaches efficacy (new target more likely than the true
    one on the rewrite prompt, as in the CounterFact metric) >= 90%. Every score is checked against its
    definition on tiny models in test_ece."""
    from dsets import CounterFactDataset
    from ece import ECEHyperParams
    from editing.context import EditContext
    from editing.sequential import SequentialState
    from util.scoring import mean_nlls
    from util.weights import load_weights, snapshot_weights

    model, tok = embedded_model_and_tok
    hparams = ECEHyperParams.from_dict(ece_test_hparams("GA"))
    requests = [record_to_request(r) for r in CounterFactDataset(data_dir, multi=True, size=10)]
    original = snapshot_weights(model, [hparams.rewrite_module(l) for l in hparams.layers])
    algorithm = evaluate.get_algorithm("ECE_GA")
    context, state = EditContext("smollm2-135m", data_dir=data_dir), SequentialState()
    try:
        report = algorithm.apply(model, tok, requests, hparams, context, state)
        prompts = [r["prompt"].format(r["subject"]) for r in requests]
        new = mean_nlls(model, tok, prompts, [r["target_new"]["str"] for r in requests])
        true = mean_nlls(model, tok, prompts, [r["target_true"]["str"] for r in requests])
    finally:
        load_weights(model, original)
    efficacy = 100.0 * sum(n < t for n, t in zip(new, true)) / len(requests)
    assert efficacy >= 90.0, efficacy
    check_explanation(report.explanation, {r["case_id"] for r in requests}, hparams.to_dict())
    assert state.rounds == 1 and state.edits == 10
