"""EasyEdit-format data: CounterFact (``--ds_name cf_easyedit[_train|_val]``) and zsRE's minimal shape,
converted to MEMIT's records; unusable records skipped and reported; size limits above the usable count
refused; one driver run on the tiny Llama with a stand-in edit."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest

import summarize
from dsets import (CF_EASYEDIT_DATASETS, EASYEDIT_SUBSTITUTE_SOURCE, CounterFactDataset, EasyEditCounterFactDataset,
                   MENDQADataset)
from dsets.attr_snippets import ANY_RELATION, easyedit_consistency_resources, snippet_key
from dsets.easyedit import GENERATION_PROMPTS_SOURCE
from dsets.data_files import DataFormatError
from dsets.zsre import UNKNOWN_TRUE_TARGET
from experiments import evaluate
from experiments.driver import RunError, load_records, record_to_request

EASYEDIT_KEYS = ("case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                 "locality_prompt", "locality_ground_truth")


def raw_split(data_dir, split):
    return json.loads((data_dir / "counterfact_easyedit" / f"counterfact-{split}.json").read_text())


def easyedit_record(case_id, subject="Toko Yasuda", prompt="Toko Yasuda, the", target_new="piano",
                    ground_truth="guitar", **changes):
    record = {"case_id": case_id, "prompt": prompt, "target_new": target_new, "subject": subject,
              "ground_truth": ground_truth, "rephrase_prompt": f"{subject} is incredible at",
              "locality_prompt": "John Lennon performs on the", "locality_ground_truth": ground_truth}
    record.update(changes)
    return record


def write_easyedit(folder, train, val=()):
    target = folder / "counterfact_easyedit"
    target.mkdir(parents=True, exist_ok=True)
    (target / "counterfact-train.json").write_text(json.dumps(list(train)))
    (target / "counterfact-val.json").write_text(json.dumps(list(val)))
    return folder


# ---------------------------------------------------------------- the real files

def test_real_files_load_completely_train_then_val(data_dir):
    train, val = raw_split(data_dir, "train"), raw_split(data_dir, "val")
    both = EasyEditCounterFactDataset(data_dir)
    assert (len(train), len(val), len(both)) == (10000, 1919, 11919)
    assert len(both.skipped) == 0 and both.skipped.to_dict() is None
    assert [r["case_id"] for r in both] == [r["case_id"] for r in train + val]  # train, then val, file order
    assert len({r["case_id"] for r in both}) == 11919
    for record, raw in zip(both, train + val):
        rewrite = record["requested_rewrite"]
        assert rewrite["prompt"].count("{}") == 1 and rewrite["prompt"].format(rewrite["subject"]) == raw["prompt"]
        assert rewrite["target_true"]["str"] == raw["locality_ground_truth"]
    only_train = EasyEditCounterFactDataset(data_dir, "cf_easyedit_train")
    only_val = EasyEditCounterFactDataset(data_dir, "cf_easyedit_val")
    assert [len(only_train), len(only_val)] == [10000, 1919]
    assert only_train.data == both.data[:10000] and only_val.data == both.data[10000:]
    assert only_val[0]["case_id"] == 10 and [p.name for p in both.paths] == ["counterfact-train.json",
                                                                                "counterfact-val.json"]


def test_known_record_field_by_field_matches_memit_counterfact(data_dir):
    """case 11 is in both formats: the conversion gives MEMIT's rewrite (without the ids) and prompts drawn
    from MEMIT's record."""
    record = next(r for r in EasyEditCounterFactDataset(data_dir) if r["case_id"] == 11)
    assert record == {
        "case_id": 11,
        "requested_rewrite": {"prompt": "{} professionally plays the sport", "subject": "Andreas Ivanschitz",
                              "target_new": {"str": "football"}, "target_true": {"str": "soccer"}},
        "paraphrase_prompts": ["Andreas Ivanschitz's greatest strength is"],
        "neighborhood_prompts": ["Andrea Pirlo professionally plays the sport"],
        "generation_prompts": ["Andreas Ivanschitz professionally plays the sport",
                               "Andreas Ivanschitz's greatest strength is"],
        "generation_prompts_source": GENERATION_PROMPTS_SOURCE,
    }
    memit = next(r for r in CounterFactDataset(data_dir) if r["case_id"] == 11)
    rewrite = memit["requested_rewrite"]
    assert record["requested_rewrite"] == {"prompt": rewrite["prompt"], "subject": rewrite["subject"],
                                           "target_new": {"str": rewrite["target_new"]["str"]},
                                           "target_true": {"str": rewrite["target_true"]["str"]}}
    assert record["neighborhood_prompts"][0] in memit["neighborhood_prompts"]
    assert record_to_request(record) == {"case_id": 11, **record["requested_rewrite"]}


# ---------------------------------------------------------------- unusable records

def test_unusable_records_are_skipped_named_and_counted(tmp_path, caplog):
    train = [
        easyedit_record(1),
        easyedit_record(2, subject="Miles Davis"),                          # subject not in the prompt
        easyedit_record(3, target_new=" "),                                 # empty target
        easyedit_record(4, target_new="guitar"),                            # target_new == ground_truth
        {k: v for k, v in easyedit_record(5).items() if k != "rephrase_prompt"},  # missing field
        easyedit_record(6, locality_ground_truth="drums"),                  # locality truth differs
        easyedit_record(7),
        easyedit_record(8, ground_truth=""),                                # empty target
        easyedit_record(1, subject="Miles Davis", prompt="Miles Davis, the"),  # duplicate case_id
        easyedit_record(9, prompt="Toko Yasuda, the {x}"),                  # braces: not a template
    ]
    val = [easyedit_record(7, subject="Miles Davis", prompt="Miles Davis plays the"),  # duplicate across files
           easyedit_record(20)]
    write_easyedit(tmp_path, train, val)
    with caplog.at_level(logging.WARNING, logger="dsets.easyedit"):
        ds = EasyEditCounterFactDataset(tmp_path)
    assert [r["case_id"] for r in ds] == [1, 7, 20] and ds.usable == 3
    assert ds[0]["requested_rewrite"]["subject"] == "Toko Yasuda"  # the first copy of case 1 is the one kept
    report = ds.skipped.to_dict()
    counts = {kind: entry["count"] for kind, entry in report["by_kind"].items()}
    assert counts == {"subject not in prompt": 1, "empty target": 2, "target_new equals ground_truth": 1,
                      "missing or malformed field": 1, "locality_ground_truth differs from ground_truth": 1,
                      "duplicate case_id": 2, "prompt unusable as a template": 1}
    assert report["count"] == 9 == len(ds.skipped)
    assert report["by_kind"]["empty target"]["first_case_ids"] == [3, 8]
    assert report["by_kind"]["duplicate case_id"]["first_case_ids"] == [1, 7]
    assert "rephrase_prompt" in report["by_kind"]["missing or malformed field"]["example"]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == len(counts)  # one warning per kind
    for kind, count in counts.items():
        (message,) = [m for m in messages if f"with {kind} " in m]
        assert f"skipped {count} record(s)" in message
    (subject_message,) = [m for m in messages if "subject not in prompt" in m]
    assert "case_id 2" in subject_message
    assert "'Miles Davis' does not occur in prompt 'Toko Yasuda, the'" in subject_message


def test_non_object_records_and_missing_case_ids_are_reported(tmp_path):
    write_easyedit(tmp_path, ["not a record", {k: v for k, v in easyedit_record(1).items() if k != "case_id"},
                              easyedit_record(2)])
    ds = EasyEditCounterFactDataset(tmp_path, "cf_easyedit_train")
    assert [r["case_id"] for r in ds] == [2]
    entry = ds.skipped.to_dict()["by_kind"]["missing or malformed field"]
    assert entry["count"] == 2 and entry["first_case_ids"][0] == "<none: counterfact-train.json index 0>"


def test_file_that_is_not_a_list_is_a_format_error(tmp_path):
    (tmp_path / "counterfact_easyedit").mkdir()
    (tmp_path / "counterfact_easyedit" / "counterfact-val.json").write_text('{"case_id": 1}')
    with pytest.raises(DataFormatError, match="counterfact-val.json: expected a JSON list"):
        EasyEditCounterFactDataset(tmp_path, "cf_easyedit_val")


# ---------------------------------------------------------------- size limits

def test_size_counts_usable_records(tmp_path):
    write_easyedit(tmp_path, [easyedit_record(1, target_new="guitar"), easyedit_record(2), easyedit_record(3)],
                   [easyedit_record(4)])
    ds = EasyEditCounterFactDataset(tmp_path, size=2)
    assert [r["case_id"] for r in ds] == [2, 3] and ds.usable == 3 and len(ds.skipped) == 1
    assert [r["case_id"] for r in load_records("cf_easyedit", str(tmp_path), 3)] == [2, 3, 4]
    with pytest.raises(RunError) as info:
        load_records("cf_easyedit", str(tmp_path), 4)
    message = str(info.value)
    assert "4 records asked for" in message and "only 3 usable" in message and "1 more skipped" in message
    assert "--dataset_size_limit 3)" in message


@pytest.mark.parametrize("ds_name, usable", [("cf_easyedit_val", 1919), ("cf", 1856), ("mcf", 1856), ("zsre", 1037)])
def test_size_limit_above_the_dataset_is_refused_for_every_dataset(data_dir, ds_name, usable):
    assert len(load_records(ds_name, str(data_dir), usable)) == usable
    with pytest.raises(RunError, match=f"{usable + 1} records asked for .* {ds_name} has only {usable} usable"):
        load_records(ds_name, str(data_dir), usable + 1)


def test_driver_records_report_what_was_skipped(tmp_path, data_dir):
    write_easyedit(tmp_path, [easyedit_record(1), easyedit_record(2, subject="")])
    records = load_records("cf_easyedit_train", str(tmp_path), None)
    assert [r["case_id"] for r in records] == [1]
    assert records.skipped["count"] == 1 and list(records.skipped["by_kind"]) == ["missing or malformed field"]
    assert load_records("cf_easyedit_train", str(data_dir), 3).skipped is None
    with pytest.raises(RunError, match="unknown dataset 'cf_easy'.*cf_easyedit_train"):
        load_records("cf_easy", str(data_dir), 3)


def test_ds_name_choices_include_the_easyedit_names():
    for name in CF_EASYEDIT_DATASETS:
        args = evaluate.parse_args(["--alg_name", "MEMIT", "--hparams_fname", "x.json", "--ds_name", name])
        assert args.ds_name == name


# ---------------------------------------------------------------- zsRE in EasyEdit's shape

EASYEDIT_ZSRE_KEYS = ("subject", "src", "alt", "rephrase", "loc", "loc_ans")


def test_zsre_in_easyedit_minimal_shape(tmp_path, data_dir):
    """Real MEND train records reduced to EasyEdit's fields: target_new is alt; unusable ones are skipped."""
    source = json.loads((data_dir / "zsre_mend_train_1k.json").read_text())[:4]
    minimal = [{k: r[k] for k in EASYEDIT_ZSRE_KEYS} for r in source]
    bad = [dict(minimal[0], subject="Nobody Here"), dict(minimal[1], alt=""),
           {k: v for k, v in minimal[2].items() if k != "loc_ans"}]
    (tmp_path / "zsre_mend_eval.json").write_text(json.dumps(minimal + bad))

    with pytest.raises(DataFormatError, match="zsRE record 4: subject 'Nobody Here' does not occur in src"):
        MENDQADataset(tmp_path)  # strict unless asked to skip
    ds = MENDQADataset(tmp_path, skip_invalid=True)
    assert ds.edit_target == "alt" and [r["case_id"] for r in ds] == [0, 1, 2, 3]
    first = ds[1]
    assert first["requested_rewrite"] == {
        "prompt": "What is the name of the constellation which {} belongs?", "subject": "Delta Serpentis",
        "target_new": {"str": "Virgo"}, "target_true": {"str": UNKNOWN_TRUE_TARGET}}
    assert first["paraphrase_prompts"] == [source[1]["rephrase"]]
    assert first["neighborhood_prompts"] == [{"prompt": source[1]["loc"] + "?", "target": "Education"}]
    counts = {kind: e["count"] for kind, e in ds.skipped.to_dict()["by_kind"].items()}
    assert counts == {"subject not in prompt": 1, "empty target": 1, "missing or malformed field": 1}
    assert ds.skipped.to_dict()["by_kind"]["missing or malformed field"]["first_case_ids"] == [6]

    records = load_records("zsre", str(tmp_path), 4)
    assert [r["case_id"] for r in records] == [0, 1, 2, 3] and records.skipped["count"] == 3
    with pytest.raises(RunError, match="only 4 usable"):
        load_records("zsre", str(tmp_path), 5)


def test_zsre_alt_convention_uses_the_true_answer_and_skips_no_op_edits(tmp_path, data_dir):
    source = json.loads((data_dir / "zsre_mend_train_1k.json").read_text())[:3]
    no_op = dict(source[0], alt=source[0]["answers"][0])
    (tmp_path / "zsre_mend_eval.json").write_text(json.dumps(source + [no_op]))
    ds = MENDQADataset(tmp_path, edit_target="alt", skip_invalid=True)
    assert [r["case_id"] for r in ds] == [0, 1, 2]
    assert ds[2]["requested_rewrite"]["target_new"] == {"str": "1997"}
    assert ds[2]["requested_rewrite"]["target_true"] == {"str": "1987"}  # answers[0], not pred ("1998")
    assert list(ds.skipped.to_dict()["by_kind"]) == ["target_new equals ground_truth"]
    answers = MENDQADataset(tmp_path)  # the file has answers: the default is the published convention
    assert answers.edit_target == "answers" and answers[2]["requested_rewrite"]["target_new"] == {"str": "1987"}


def test_consistency_references_are_true_sentences_of_the_same_object(tmp_path, data_dir):
    """The references of target_new are the rewrite and neighbourhood sentences of records (both files) whose
    true object is that string, never sentences that state target_new as a counterfactual."""
    data = write_easyedit(tmp_path / "data", [
        easyedit_record(1),  # piano <- guitar
        easyedit_record(2, subject="Miles Davis", prompt="Miles Davis plays the", target_new="guitar",
                        ground_truth="piano", locality_prompt="Herbie Hancock plays the"),
    ], val=[easyedit_record(3, subject="Keith Jarrett", prompt="Keith Jarrett, the", target_new="violin",
                            ground_truth="piano", locality_prompt="Bill Evans plays the")])
    for name in ("counterfact.json", "wikitext"):
        (data / name).symlink_to(data_dir / name)
    resources = easyedit_consistency_resources(data, stats_dir=tmp_path / "stats")
    assert resources.source == EASYEDIT_SUBSTITUTE_SOURCE and resources.vectors is not None
    assert sorted(resources.snippets.texts(ANY_RELATION, "piano")) == [
        "Bill Evans plays the piano", "Herbie Hancock plays the piano", "Keith Jarrett, the piano",
        "Miles Davis plays the piano"]
    assert resources.snippets.texts(ANY_RELATION, "guitar") == ["Toko Yasuda, the guitar",
                                                                 "John Lennon performs on the guitar"]
    assert resources.snippets.texts(ANY_RELATION, "violin") == []
    record = EasyEditCounterFactDataset(data)[0]
    assert snippet_key(record["requested_rewrite"]) == (ANY_RELATION, "piano")
    memit_rewrite = {"relation_id": "P1303", "target_new": {"str": "piano", "id": "Q5994"}}
    assert snippet_key(memit_rewrite) == ("P1303", "Q5994")


# ---------------------------------------------------------------- the driver end to end

@pytest.fixture
def tiny_easyedit_run(tmp_path, monkeypatch, tiny_llama, tiny_tok, make_hparams):
    """``run(*argv)``: a sequential driver run on the tiny Llama whose edit is a stand-in (the first edited
    layer's weight grows by half each round), so no statistics or target values are computed. Returns the
    run folder and the case ids of each round's requests."""
    monkeypatch.setenv("ECE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("ECE_STATS_DIR", str(tmp_path / "stats"))
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a, **k: (copy.deepcopy(tiny_llama), tiny_tok))
    hparams_file = tmp_path / "tiny_memit.json"
    hparams_file.write_text(json.dumps(make_hparams("llama").to_dict()))
    applied = []

    def stand_in_edit(model, tok, requests, hparams, context, state):
        from editing.round import EditReport
        from util.weights import add_to_weight, read_weight

        assert all(set(r) == {"case_id", "prompt", "subject", "target_new", "target_true"} for r in requests)
        name = hparams.rewrite_module(hparams.layers[0])
        add_to_weight(model, name, 0.5 * read_weight(model, name))
        applied.append([r["case_id"] for r in requests])
        return EditReport()

    algorithm = dataclasses.replace(evaluate.get_algorithm("MEMIT"), apply=stand_in_edit)
    monkeypatch.setattr(evaluate, "get_algorithm", lambda name: algorithm)

    def run(*argv):
        applied.clear()
        run_dir = evaluate.main(["--alg_name", "MEMIT", "--sequential", "--hparams_fname", str(hparams_file),
                                 "--model_name", "tiny-llama", "--device", "cpu", *argv])
        return run_dir, list(applied)

    return run


def test_driver_run_on_easyedit_counterfact_writes_memit_case_files(tiny_easyedit_run, data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        run_dir, applied = tiny_easyedit_run("--ds_name", "cf_easyedit", "--data_dir", str(data_dir),
                                             "--dataset_size_limit", "4", "--num_edits", "2")
    expected = [r["case_id"] for r in raw_split(data_dir, "train")[:4]]
    assert applied == [expected[:2], expected[2:]]
    params = json.loads((run_dir / "params.json").read_text())
    assert params["ds_name"] == "cf_easyedit" and params["dataset_size_limit"] == 4
    assert params["dataset_skipped"] is None
    cases = sorted(run_dir.glob("2_edits-case_*.json"))
    assert sorted(int(p.stem.split("_")[-1]) for p in cases) == sorted(expected)
    for path in cases:
        case = json.loads(path.read_text())
        assert set(case["requested_rewrite"]) == {"prompt", "subject", "target_new", "target_true"}
        for stage in ("pre", "post", "final"):
            metrics = case[stage]
            assert [len(metrics[f"{kind}_probs"]) for kind in ("rewrite_prompts", "paraphrase_prompts",
                                                                "neighborhood_prompts")] == [1, 1, 1]
        # A sequential run has the generation tests after the last round only (AlphaEdit's protocol).
        for stage in ("pre", "post"):
            assert not {"text", "ngram_entropy", "reference_score"} & set(case[stage])
        final = case["final"]
        assert len(final["text"]) == 2 and final["generation_prompts_source"] == GENERATION_PROMPTS_SOURCE
        assert final["text"][0].startswith(case["requested_rewrite"]["prompt"].format(
            case["requested_rewrite"]["subject"]))
        assert final["ngram_entropy"] > 0
        assert final["consistency_source"] == EASYEDIT_SUBSTITUTE_SOURCE and 0 <= final["reference_score"] <= 1
    assert not [r for r in caplog.records if "no generation_prompts" in r.getMessage()]
    summary = summarize.summarize_run(run_dir)
    assert summary["n_cases"] == 4 and summary["ds_name"] == "cf_easyedit"
    assert {"pre", "post", "final"} <= set(summary["stages"])
    final = summary["stages"]["final"]
    assert final["fluency"]["n"] == 4 and final["consistency"]["n"] == 4
    assert final["generation_prompts_source"] == GENERATION_PROMPTS_SOURCE
    assert final["consistency_source"] == EASYEDIT_SUBSTITUTE_SOURCE

    with pytest.raises(RunError, match="ds_name: run has 'cf_easyedit', now 'cf_easyedit_train'"):
        tiny_easyedit_run("--ds_name", "cf_easyedit_train", "--data_dir", str(data_dir),
                          "--dataset_size_limit", "4", "--num_edits", "2", "--continue_from_run", run_dir.name)


def test_final_generation_texts_are_sampled_across_evaluation_groups(tiny_easyedit_run, data_dir, monkeypatch):
    """The final stage is scored group by group (each saved as it ends), but the fluency texts of many cases
    are sampled in one call (GENERATION_GROUP cases), not one small call per group."""
    from experiments.driver import Evaluator

    calls = []
    real = Evaluator.generation_only

    def counting(self, model, tok, records):
        calls.append([r["case_id"] for r in records])
        return real(self, model, tok, records)

    monkeypatch.setattr(Evaluator, "generation_only", counting)
    monkeypatch.setattr(evaluate, "FINAL_EVALUATION_GROUP", 1)
    monkeypatch.setattr(evaluate, "GENERATION_GROUP", 3)
    run_dir, _ = tiny_easyedit_run("--ds_name", "cf_easyedit", "--data_dir", str(data_dir), "--dataset_size_limit",
                                   "4", "--num_edits", "2", "--skip_free_generation")
    expected = [r["case_id"] for r in raw_split(data_dir, "train")[:4]]
    assert calls == [expected[:3], expected[3:]]
    for path in run_dir.glob("2_edits-case_*.json"):
        final = json.loads(path.read_text())["final"]
        assert len(final["text"]) == 2 and final["ngram_entropy"] > 0 and "rewrite_prompts_probs" in final


def test_resumed_run_adds_missing_generation_tests_to_finished_cases(tiny_easyedit_run, data_dir):
    """A run whose pre and final stages were scored without the generation tests gets them on resume (pre on
    the unedited weights), nothing else changes, and no round is repeated; the texts equal those of a run
    that had them from the start."""
    common = ("--ds_name", "cf_easyedit", "--data_dir", str(data_dir), "--dataset_size_limit", "3",
              "--num_edits", "3", "--skip_free_generation")
    run_dir, _ = tiny_easyedit_run(*common, "--generation_stages", "post")
    before = {p.name: json.loads(p.read_text()) for p in run_dir.glob("3_edits-case_*.json")}
    assert all("ngram_entropy" in c["post"] and "ngram_entropy" not in c["final"] for c in before.values())
    resumed, applied = tiny_easyedit_run(*common, "--generation_stages", "pre,final", "--continue_from_run",
                                         run_dir.name)
    assert resumed == run_dir and applied == []
    fresh, _ = tiny_easyedit_run(*common, "--generation_stages", "pre,final")
    for name, old in before.items():
        case, fresh_case = json.loads((run_dir / name).read_text()), json.loads((fresh / name).read_text())
        assert case["post"] == old["post"]
        for stage in ("pre", "final"):
            added = {k: v for k, v in case[stage].items() if k not in old[stage]}
            assert {"text", "ngram_entropy", "reference_score", "generation_prompts_source"} <= set(added)
            assert {k: case[stage][k] for k in old[stage]} == old[stage]
            assert case[stage]["text"] == fresh_case[stage]["text"]
        assert case["pre"]["text"] != case["final"]["text"]  # unedited against edited weights
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--alg_name", "MEMIT", "--hparams_fname", "x.json", "--generation_stages", "middle"])
    with pytest.raises(RunError, match="--generation_stages final needs a final evaluation"):
        tiny_easyedit_run(*common, "--no-sequential", "--generation_stages", "final")


def test_driver_run_records_skipped_records_and_refuses_a_too_large_limit(tiny_easyedit_run, tmp_path):
    data = write_easyedit(tmp_path / "data", [
        easyedit_record(1), easyedit_record(2, target_new="guitar"),
        easyedit_record(3, subject="Miles Davis", prompt="Miles Davis plays the"),
    ])
    run_dir, applied = tiny_easyedit_run("--ds_name", "cf_easyedit_train", "--data_dir", str(data),
                                         "--num_edits", "1", "--skip_generation_tests")
    assert applied == [[1], [3]]
    skipped = json.loads((run_dir / "params.json").read_text())["dataset_skipped"]
    assert skipped["count"] == 1 and skipped["by_kind"]["target_new equals ground_truth"]["first_case_ids"] == [2]
    with pytest.raises(RunError, match="3 records asked for .* only 2 usable"):
        tiny_easyedit_run("--ds_name", "cf_easyedit_train", "--data_dir", str(data), "--dataset_size_limit", "3")
