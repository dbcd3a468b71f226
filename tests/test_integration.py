"""End to end on the embedded model (SmolLM2-135M) with real CounterFact records."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import summarize
from experiments import evaluate

SHIPPED = Path(__file__).resolve().parent.parent / "hparams"


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


def test_interrupted_sequential_run_resumes_to_the_same_results(env, monkeypatch):
    args = ["--alg_name", "MEMIT", "--sequential", "--hparams_fname", str(env / "memit.json"),
            "--dataset_size_limit", "2", "--num_edits", "1"]
    reference = cases(run(*args))
    memit = evaluate.get_algorithm("MEMIT")
    calls = {"n": 0}

    def crash_in_second_round(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return memit.apply(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "get_algorithm", lambda name: dataclasses.replace(memit, apply=crash_in_second_round))
        with pytest.raises(KeyboardInterrupt):
            run(*args)
    interrupted = sorted((env / "results" / "MEMIT").glob("run_*"))[-1]
    assert len(cases(interrupted)) == 1  # the first round's cases are on disk, nothing else
    # MEMIT --sequential is AlphaEdit's plain MEMIT row: the edits are kept, C_prev never is.
    saved = torch.load(interrupted / "sequential_state.pt", weights_only=True)["state"]
    assert saved["prev_moments"] == {} and saved["track_prev_moments"] is False and saved["rounds"] == 1
    resumed = cases(run(*args, "--continue_from_run", interrupted.name))
    assert resumed.keys() == reference.keys()
    for name, case in reference.items():
        for stage in ("pre", "post", "final"):
            for kind in ("rewrite_prompts_probs", "paraphrase_prompts_probs", "neighborhood_prompts_probs"):
                for a, b in zip(case[stage][kind], resumed[name][stage][kind]):
                    assert a["target_new"] == pytest.approx(b["target_new"], abs=1e-3)
                    assert a["target_true"] == pytest.approx(b["target_true"], abs=1e-3)


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


def test_sequential_protocol_and_downstream_schedule(env, monkeypatch, embedded_model_and_tok):
    """A stand-in edit (cheap, known effect) checks the driver's bookkeeping: pre on the unedited model,
    post after each round, final after the last, downstream checks before round 1 and after each round."""
    from util.weights import add_to_weight, read_weight

    memit = evaluate.get_algorithm("MEMIT")
    applied = []

    def scale_down_layer(model, tok, requests, hparams, context, state):
        name = hparams.rewrite_module(hparams.layers[0])
        add_to_weight(model, name, -0.5 * read_weight(model, name))
        applied.append([r["case_id"] for r in requests])
        from editing.round import EditReport
        return EditReport()

    monkeypatch.setattr(evaluate, "get_algorithm", lambda name: dataclasses.replace(memit, apply=scale_down_layer))
    run_dir = run("--alg_name", "MEMIT", "--sequential", "--hparams_fname", str(env / "memit.json"),
                  "--dataset_size_limit", "2", "--num_edits", "1", "--downstream_eval_steps", "1",
                  "--downstream_examples", "2")
    assert len(applied) == 2
    first, second = [c for _, c in sorted(cases(run_dir).items())]
    nll = lambda case, stage: case[stage]["rewrite_prompts_probs"][0]["target_true"]
    # The first case's post state (one edit) differs from the final state (two edits); the second
    # case's pre was measured after round 1 but on the unedited weights.
    assert nll(first, "post") != pytest.approx(nll(first, "final"), abs=1e-4)
    assert nll(second, "post") == pytest.approx(nll(second, "final"), abs=1e-5)
    assert nll(first, "pre") != pytest.approx(nll(first, "post"), abs=1e-4)
    from util.scoring import mean_nlls

    rewrite = second["requested_rewrite"]
    (unedited,) = mean_nlls(*embedded_model_and_tok, [rewrite["prompt"].format(rewrite["subject"])],
                            [rewrite["target_true"]["str"]])
    assert nll(second, "pre") == pytest.approx(unedited, abs=1e-4)
    glue = sorted(p.name for p in (run_dir / "glue_eval").glob("*.json"))
    assert glue == ["edits_000000.json", "edits_000001.json", "edits_000002.json"]
    counts = [json.loads((run_dir / "glue_eval" / g).read_text())["edit_count"] for g in glue]
    assert counts == [0, 1, 2]


def ece_test_hparams(method):
    """Shipped ECE hparams with, for the suite's time budget, 12 target steps over 3 context templates
    (shipped: 25 over 6; the README's measurements use the shipped files) and 400 statistics samples."""
    hparams = json.loads((SHIPPED / f"ECE_{method}" / "smollm2-135m.json").read_text())
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


@pytest.mark.parametrize("method", ["AS", "RS", "GA"])
def test_ece_variant_two_sequential_rounds_of_ten_real_edits(env, method, embedded_model_and_tok, data_dir):
    """The other neuron scores, in process (the driver path is tested above): two sequential rounds of 10
    real edits, efficacy (new target more likely than the true one on the rewrite prompt, as in the
    CounterFact metric) >= 90% after each round."""
    from dsets import CounterFactDataset
    from ece import ECEHyperParams
    from editing.context import EditContext
    from editing.sequential import SequentialState
    from util.scoring import mean_nlls
    from util.weights import load_weights, snapshot_weights

    model, tok = embedded_model_and_tok
    hparams = ECEHyperParams.from_dict(ece_test_hparams(method))
    records = list(CounterFactDataset(data_dir, multi=True, size=20))
    original = snapshot_weights(model, [hparams.rewrite_module(l) for l in hparams.layers])
    algorithm = evaluate.get_algorithm(f"ECE_{method}")
    context, state = EditContext("smollm2-135m", data_dir=data_dir), SequentialState()
    try:
        for start in (0, 10):
            requests = [evaluate.record_to_request(r) for r in records[start : start + 10]]
            report = algorithm.apply(model, tok, requests, hparams, context, state)
            prompts = [r["prompt"].format(r["subject"]) for r in requests]
            new = mean_nlls(model, tok, prompts, [r["target_new"]["str"] for r in requests])
            true = mean_nlls(model, tok, prompts, [r["target_true"]["str"] for r in requests])
            efficacy = 100.0 * sum(n < t for n, t in zip(new, true)) / len(requests)
            assert efficacy >= 90.0, (method, start, efficacy)
            check_explanation(report.explanation, {r["case_id"] for r in requests}, hparams.to_dict())
        assert state.rounds == 2 and state.edits == 20
    finally:
        load_weights(model, original)
