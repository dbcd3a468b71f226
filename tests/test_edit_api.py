"""The editing API (editing/api.py), the request checks (editing/requests.py) and experiments/edit.py, on the
tiny models; one slow test does the issue's acceptance check on the embedded model."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

from ece import ECEHyperParams
from editing.api import Editor, edit, read_manifest, save_edited_model
from editing.requests import check_requests
from util.errors import ECEError, RequestError, SettingError
from util.hparams import HParamsError

EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
          "target_true": "Paris"}
MILES = {"prompt": "{}, who plays the", "subject": "Miles Davis", "target_new": "piano", "target_true": "trumpet"}


def hparams_values(make_hparams, arch: str, cls=None, **overrides) -> dict:
    """The tiny models' hparams as the dict a user would pass (without the unset compatibility keys)."""
    hparams = make_hparams(arch, cls, **overrides) if cls else make_hparams(arch, **overrides)
    return {k: v for k, v in hparams.to_dict().items() if v is not None or k not in type(hparams).COMPATIBILITY_KEYS}


@pytest.fixture
def ece_values(make_hparams):
    # The delta at the last prompt token: a random tiny model's attention barely carries one at the subject
    # to the position that predicts the target.
    return hparams_values(make_hparams, "llama", ECEHyperParams, neuron_threshold=0.8, max_clusters=4,
                          fact_token="last")


def sharpen(model):
    """A random tiny model predicts almost uniformly; larger (tied) embeddings give it logits an edit can move."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    return model


def first_token(tok, target: str) -> str:
    from util.tokens import target_ids

    return tok.decode(target_ids(tok, target)[:1])


def all_weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the API ------------------------------------------------------------------------------------------

def test_edit_moves_the_new_target_and_restore_gives_back_the_exact_weights(tiny_llama, tiny_tok, stats_dir,
                                                                          ece_values):
    sharpen(tiny_llama)
    original = all_weights(tiny_llama)
    result = edit(tiny_llama, tiny_tok, [EIFFEL, MILES], alg="ECE_WI", hparams=ece_values, model_name="tiny-llama")
    assert not same_weights(original, all_weights(tiny_llama))
    assert result.model is tiny_llama and result.algorithm == "ECE_WI"
    for r in result.requests:
        new = first_token(tiny_tok, r.request["target_new"]["str"])
        assert r.before.top_token != new and r.after.top_token == new, r.to_dict()
        assert r.after.new > 10 * r.before.new, r.to_dict()
        assert 1 <= r.steps <= ece_values["v_num_grad_steps"] and r.loss > 0
    assert [q["subject"] for q in result.explanation["requests"]] == ["The Eiffel Tower", "Miles Davis"]
    assert "p(new)" in result.summary() and result.to_dict()["requests"][0]["after"]["p_new"] == result.requests[0].after.new
    result.restore()
    assert same_weights(original, all_weights(tiny_llama))


def test_both_request_forms_give_the_same_edit(tiny_tok, stats_dir, make_hparams):
    from tests.conftest import make_tiny_gpt2

    values = hparams_values(make_hparams, "gpt2")
    memit_form = {"case_id": 7, "requested_rewrite": {"prompt": EIFFEL["prompt"], "subject": EIFFEL["subject"],
                                                      "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}}}
    subject_text = {**EIFFEL, "prompt": "The Eiffel Tower is located in the city of"}  # EasyEdit's shape
    weights = []
    for request in (EIFFEL, memit_form, subject_text):
        model = make_tiny_gpt2()
        result = edit(model, tiny_tok, [request], alg="MEMIT", hparams=values, model_name="tiny-gpt2")
        assert result.requests[0].request["prompt"] == EIFFEL["prompt"]
        assert result.requests[0].steps >= 1 and result.requests[0].loss is None  # MEMIT reports no loss
        weights.append(all_weights(model))
    assert same_weights(weights[0], weights[1]) and same_weights(weights[0], weights[2])
    assert check_requests([memit_form])[0]["case_id"] == 7 and check_requests([EIFFEL])[0]["case_id"] == 0


def test_hparams_from_a_file_a_dict_overrides_or_the_shipped_file(tiny_llama, tiny_tok, tmp_path, ece_values):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(ece_values))
    from_file = Editor(tiny_llama, tiny_tok, "ECE_WI", str(path), {"v_num_grad_steps": 3}, model_name="tiny")
    assert from_file.hparams.v_num_grad_steps == 3 and from_file.hparams_source == str(path)
    from_dict = Editor(tiny_llama, tiny_tok, "ECE_AS", ece_values, {"neuron_threshold": 0.5}, model_name="tiny")
    assert from_dict.hparams.neuron_threshold == 0.5 and from_dict.hparams.layers == ece_values["layers"]
    shipped = Editor(tiny_llama, tiny_tok, "AlphaEdit", model_name="smollm2-135m")
    assert shipped.hparams_source.endswith("hparams/AlphaEdit/smollm2-135m.json")
    assert Editor(tiny_llama, tiny_tok, "MEMIT_seq", model_name="smollm2-135m").hparams_source.endswith(
        "hparams/MEMIT/smollm2-135m.json")
    with pytest.raises(HParamsError, match="unknown key.*v_num_steps"):
        Editor(tiny_llama, tiny_tok, "ECE_WI", ece_values, {"v_num_steps": 3}, model_name="tiny")
    with pytest.raises(HParamsError, match="no shipped ECE_WI hyperparameters for model 'tiny'.*smollm2-135m"):
        Editor(tiny_llama, tiny_tok, "ECE_WI", model_name="tiny")
    with pytest.raises(SettingError, match="unknown algorithm 'ECE'.*ECE_WI"):
        Editor(tiny_llama, tiny_tok, "ECE", ece_values, model_name="tiny")


def algorithm_values(make_hparams, name: str) -> dict:
    """Hparams of any registered algorithm for the tiny GPT-2 (Conv1D weights)."""
    from experiments.algorithms import get_algorithm

    if name == "FT":
        return {"layers": [1], "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "num_steps": 5, "lr": 0.01,
                "weight_decay": 0, "norm_constraint": False}
    layers = {"layers": [2]} if name == "ROME" else {}
    return hparams_values(make_hparams, "gpt2", get_algorithm(name).hparams_class, fact_token="last", **layers)


ALGORITHMS = ["ROME", "MEMIT", "MEMIT_seq", "FT", "AlphaEdit", "MEMIT_prune", "MEMIT_rect", "ECE_WI", "ECE_AS",
              "ECE_RS", "ECE_GA"]


def test_the_algorithm_list_is_the_registry():
    from experiments.algorithms import algorithm_names

    assert sorted(ALGORITHMS) == algorithm_names()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_edits_through_the_one_entry_point(name, tiny_tok, stats_dir, make_hparams):
    from tests.conftest import make_tiny_gpt2

    model = sharpen(make_tiny_gpt2())
    original = all_weights(model)
    result = edit(model, tiny_tok, [EIFFEL, MILES], alg=name, hparams=algorithm_values(make_hparams, name),
                  model_name="tiny-gpt2")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {f"{module}.weight" for module in result._editor.modules}
    assert all(r.steps >= 1 and r.after.new != r.before.new for r in result.requests)
    assert sum(r.after.new > r.before.new for r in result.requests) >= 1
    assert (result.explanation is not None) == name.startswith("ECE")
    result.restore()
    assert same_weights(original, all_weights(model))


BAD_REQUESTS = [
    ({**MILES, "prompt": "Miles Davis plays the"}, None),  # fine: the subject's text becomes the placeholder
    ({**MILES, "prompt": "He plays the"}, "has no '{}' and does not contain the subject; write '{}'"),
    ({**MILES, "prompt": "{} and {} play the"}, "contains '{}' 2 times"),
    ({**MILES, "prompt": "{} plays the {instrument}"}, "braces other than"),
    ({**MILES, "prompt": "{} plays the "}, "ends with whitespace"),
    ({**MILES, "subject": ""}, "no subject"),
    ({**MILES, "target_new": "  "}, "target_new is empty; give the new object"),
    ({k: v for k, v in MILES.items() if k != "target_new"}, "target_new is missing"),
    ({**MILES, "target_new": {"text": "piano"}}, "target_new .* has no text under 'str'"),
    ({**MILES, "target_true": ""}, "target_true is empty"),
    ({**MILES, "target_new": "trumpet "}, "target_new and target_true are both 'trumpet'.*different target_new"),
    ({**MILES, "target": "piano"}, r"unknown key\(s\) \['target'\]"),
    ("Miles Davis plays the piano", "a str, not an object"),
]


@pytest.mark.parametrize("bad, message", BAD_REQUESTS)
def test_each_request_check_names_the_request_and_the_problem(bad, message):
    if message is None:
        assert check_requests([EIFFEL, bad])[1]["prompt"] == "{} plays the"
        return
    with pytest.raises(RequestError) as info:
        check_requests([EIFFEL, bad])
    text = str(info.value)
    assert "\n" not in text and text.startswith("request 1")
    if isinstance(bad, dict) and bad.get("subject"):
        assert text.startswith("request 1 (subject 'Miles Davis'): ")
    assert re.search(message, text), text


def test_request_checks_run_before_anything_is_edited(tiny_llama, tiny_tok, tmp_path, monkeypatch, ece_values):
    original = all_weights(tiny_llama)
    monkeypatch.setenv("ECE_STATS_DIR", str(tmp_path / "stats"))
    long_prompt = {**EIFFEL, "prompt": "{} " + "is a very tall and old iron tower that " * 20 + "is located in"}
    for bad, message in [([EIFFEL, {**MILES, "target_new": ""}], "request 1 .*target_new is empty"),
                         ([long_prompt], r"request 0 \(subject 'The Eiffel Tower'\): prompt and target are \d+ "
                                         "tokens.*over the model's 128 positions; shorten the prompt"),
                         ([], "no requests")]:
        with pytest.raises(RequestError, match=message):
            edit(tiny_llama, tiny_tok, bad, alg="ECE_WI", hparams=ece_values, model_name="tiny")
    with pytest.raises(RequestError, match="ECE_GA scores neurons by the gradient of the true target; give target_true"):
        edit(tiny_llama, tiny_tok, [{k: v for k, v in EIFFEL.items() if k != "target_true"}], alg="ECE_GA",
             hparams=ece_values, model_name="tiny")
    assert same_weights(original, all_weights(tiny_llama)) and not (tmp_path / "stats").exists()
    assert issubclass(RequestError, ECEError)


def test_driver_records_use_the_same_checks_and_stay_unchanged():
    from experiments.driver import record_to_request

    record = {"case_id": 5, "requested_rewrite": {"prompt": "{} plays the", "relation_id": "P1303",
                                                  "subject": "Miles Davis", "target_new": {"str": "piano", "id": "Q1"},
                                                  "target_true": {"str": "trumpet", "id": "Q2"}}}
    assert record_to_request(record) == {"case_id": 5, **record["requested_rewrite"]}
    # zsRE's records may carry the same new and true target: a dataset record is not refused for it.
    same = {"case_id": 6, "requested_rewrite": {**record["requested_rewrite"], "target_new": {"str": "trumpet"}}}
    assert record_to_request(same)["target_new"] == {"str": "trumpet"}
    for rewrite, message in [({"prompt": "Miles Davis plays the"}, "case 5 .*no '{}' placeholder"),
                             ({"target_new": {"str": ""}}, "case 5 .*target_new is empty")]:
        bad = {"case_id": 5, "requested_rewrite": {**record["requested_rewrite"], **rewrite}}
        with pytest.raises(RequestError, match=message):
            record_to_request(bad)


def test_edits_accumulate_with_c_prev_and_restore_undoes_only_the_last(tiny_llama, tiny_tok, stats_dir, ece_values):
    from util.weights import load_weights, snapshot_weights

    sharpen(tiny_llama)
    first = edit(tiny_llama, tiny_tok, [EIFFEL], alg="ECE_WI", hparams=ece_values, model_name="tiny-llama")
    after_first = all_weights(tiny_llama)
    second = edit(tiny_llama, tiny_tok, [MILES], alg="ECE_WI", hparams=ece_values, model_name="tiny-llama")
    editors = list(tiny_llama._ece_editors.values())
    assert len(editors) == 1 and second._editor is first._editor
    state = editors[0].state
    assert (state.rounds, state.edits) == (2, 2) and set(state.prev_moments) == set(ece_values["layers"])
    assert second.requests[0].after.new > 10 * second.requests[0].before.new
    with_c_prev = snapshot_weights(tiny_llama, editors[0].modules)

    # The same second edit without the first one's C_prev moves the weights elsewhere.
    second.restore()
    assert same_weights(after_first, all_weights(tiny_llama)) and editors[0].state.rounds == 1
    fresh = Editor(tiny_llama, tiny_tok, "ECE_WI", ece_values, model_name="tiny-llama")
    fresh.context = editors[0].context  # the same templates: only C_prev differs
    fresh.rounds = 1  # and the same seed
    fresh.edit([MILES])
    without = snapshot_weights(tiny_llama, editors[0].modules)
    assert any(not torch.allclose(with_c_prev[m], without[m]) for m in with_c_prev)
    load_weights(tiny_llama, with_c_prev)

    # Another method or other hparams get their own editor.
    edit(tiny_llama, tiny_tok, [EIFFEL], alg="ECE_WI", hparams={**ece_values, "v_num_grad_steps": 5},
         model_name="tiny-llama")
    assert len(tiny_llama._ece_editors) == 2


def test_a_failing_edit_leaves_the_model_as_it_was(tiny_llama, tiny_tok, stats_dir, ece_values, monkeypatch):
    editor = Editor(tiny_llama, tiny_tok, "ECE_WI", ece_values, model_name="tiny-llama")
    original = all_weights(tiny_llama)

    def half_done(model, *args):
        from util.weights import add_to_weight, read_weight

        add_to_weight(model, editor.modules[0], torch.ones_like(read_weight(model, editor.modules[0])))
        raise RuntimeError("out of memory")

    monkeypatch.setattr(editor, "algorithm", dataclasses.replace(editor.algorithm, apply=half_done))
    with pytest.raises(RuntimeError, match="out of memory"):
        editor.edit([EIFFEL])
    assert same_weights(original, all_weights(tiny_llama)) and editor.rounds == 0


# -- saving and reloading -----------------------------------------------------------------------------

def logits_of(model, tok, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_saved_model_reloads_with_transformers_and_gives_the_same_logits(tiny_llama, tiny_tok_bos, stats_dir,
                                                                          ece_values, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from util.models import load_model_and_tokenizer

    editor = Editor(tiny_llama, tiny_tok_bos, "ECE_WI", ece_values, {"v_num_grad_steps": 10}, model_name="tiny-llama")
    result = editor.edit([EIFFEL, MILES])
    out = tmp_path / "edited"
    assert save_edited_model(out, editor, [result]) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "stats"]  # no temporary folder left
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())  # not the temporary 0600

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    prompt = "The Eiffel Tower is located in the city of"
    assert tok(prompt)["input_ids"] == tiny_tok_bos(prompt)["input_ids"]
    assert tok(prompt)["input_ids"][0] == tiny_tok_bos.bos_token_id  # the BOS is still added
    assert torch.allclose(logits_of(model, tok, prompt), logits_of(tiny_llama, tiny_tok_bos, prompt), atol=1e-6)

    manifest = json.loads((out / "edit_manifest.json").read_text())
    assert manifest["base_model"] == "tiny-llama" and manifest["edited_from"] == "tiny-llama"
    assert manifest["algorithm"] == "ECE_WI" and manifest["hparams"] == editor.hparams.to_dict()
    assert manifest["hparams"]["v_num_grad_steps"] == 10 and manifest["hparams_overrides"] == {"v_num_grad_steps": 10}
    assert manifest["edited_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    (first, second), = [e["requests"] for e in manifest["edits"]]
    assert (first["subject"], first["target_new"], first["target_true"]) == ("The Eiffel Tower", "Rome", "Paris")
    assert first["steps"] == result.requests[0].steps and first["after"]["p_new"] == result.requests[0].after.new
    assert {"torch", "transformers"} <= set(manifest["versions"]) and manifest["date"].endswith("+00:00")

    # The project's loader takes the folder; it stands for its base model (hparams, statistics).
    reloaded, reloaded_tok = load_model_and_tokenizer(str(out), device="cpu", dtype="float32")
    further = Editor(reloaded, reloaded_tok, "ECE_WI", ece_values)
    assert further.base_model == "tiny-llama" and further.context.model_name == "tiny-llama"
    assert read_manifest(str(out))["edits"][0]["requests"][1]["subject"] == "Miles Davis"


def test_a_failed_save_leaves_no_folder_and_a_foreign_folder_is_refused(tiny_llama, tiny_tok, stats_dir,
                                                                         ece_values, tmp_path, monkeypatch):
    from util.errors import SettingError

    editor = Editor(tiny_llama, tiny_tok, "ECE_WI", ece_values, model_name="tiny-llama")
    result = editor.edit([EIFFEL])
    out = tmp_path / "models" / "edited"
    monkeypatch.setattr(tiny_tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_edited_model(out, editor, [result])
    assert list((tmp_path / "models").iterdir()) == []
    monkeypatch.undo()
    save_edited_model(out, editor, [result])
    save_edited_model(out, editor, [result, result])  # an earlier edited model is replaced whole
    assert len(read_manifest(str(out))["edits"]) == 2 and [p.name for p in out.parent.iterdir()] == ["edited"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(SettingError, match="folder exists and holds no edited model.*give a new folder"):
        save_edited_model(foreign, editor, [result])
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]


# -- experiments/edit.py ------------------------------------------------------------------------------

@pytest.fixture
def tiny_folder(tmp_path, tiny_tok_bos):
    """A tiny Llama saved with save_pretrained, as a user's own model folder."""
    from tests.conftest import make_tiny_llama

    folder = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(folder)
    tiny_tok_bos.save_pretrained(folder)
    return folder


def test_command_edits_a_model_folder_prints_generations_and_saves(tiny_folder, tmp_path, stats_dir, ece_values,
                                                                    capsys):
    from experiments import edit as command

    hparams = tmp_path / "ece_tiny.json"
    hparams.write_text(json.dumps(ece_values))
    out = tmp_path / "out"
    argv = ["--model_name", str(tiny_folder), "--device", "cpu", "--alg_name", "ECE_RS", "--hparams_fname",
            str(hparams), "--hparams", "v_num_grad_steps=12", "--subject", "The Eiffel Tower", "--prompt",
            "{} is located in the city of", "--target_new", "Rome", "--target_true", "Paris", "--generate",
            "The Eiffel Tower is in", "Rome is", "--max_new_tokens", "5", "--save_dir", str(out)]
    assert command.cli(argv) == 0
    printed = capsys.readouterr().out
    assert "ECE_RS: 1 request(s) edited" in printed and "[0] The Eiffel Tower is located in the city of" in printed
    assert printed.count("before: ") == 2 and printed.count("after:  ") == 2 and "'Rome is' (greedy)" in printed
    assert "new  ' Rome'" in printed and "true ' Paris'" in printed and f"saved the edited model in {out}" in printed
    manifest = read_manifest(str(out))
    assert manifest["base_model"] == str(tiny_folder) and manifest["hparams"]["v_num_grad_steps"] == 12
    assert manifest["algorithm"] == "ECE_RS" and manifest["edits"][0]["requests"][0]["target_new"] == "Rome"

    # The saved folder takes further edits, from a requests file (JSONL), and records the earlier ones.
    requests = tmp_path / "more.jsonl"
    requests.write_text(json.dumps(MILES) + "\n\n" + json.dumps({**EIFFEL, "target_new": "Berlin"}) + "\n")
    again = tmp_path / "again"
    assert command.cli(["--model_name", str(out), "--device", "cpu", "--hparams_fname", str(hparams),
                        "--requests", str(requests), "--save_dir", str(again)]) == 0
    printed = capsys.readouterr().out
    assert "ECE_WI: 2 request(s) edited" in printed and "[1] The Eiffel Tower" in printed and "greedy" not in printed
    manifest = read_manifest(str(again))
    assert manifest["base_model"] == str(tiny_folder) and manifest["edited_from"] == str(out)
    assert manifest["previous_manifest"]["algorithm"] == "ECE_RS"


@pytest.mark.parametrize("argv, message", [
    (["--subject", "Miles Davis", "--prompt", "He plays the", "--target_new", "piano"],
     "error: request 0 (subject 'Miles Davis'): prompt 'He plays the' has no '{}' and does not contain the subject"),
    (["--subject", "Miles Davis", "--prompt", "{} plays the", "--target_new", "trumpet", "--target_true", "trumpet"],
     "error: request 0 (subject 'Miles Davis'): target_new and target_true are both 'trumpet'"),
    (["--requests", "REQUESTS"], "error: request 1 (subject 'Miles Davis'): target_new is empty"),
    (["--subject", "Miles Davis", "--prompt", "{} plays the", "--target_new", "piano",
      "--hparams_fname", "nope.json"], "error: hyperparameter file 'nope.json' not found"),
    (["--subject", "Miles Davis", "--prompt", "{} plays the", "--target_new", "piano", "--alg_name", "MEMTI"],
     "error: unknown algorithm 'MEMTI'"),
    (["--subject", "Miles Davis", "--prompt", "{} plays the", "--target_new", "piano", "--save_dir", "FOREIGN"],
     "error: cannot save the edited model in FOREIGN: the folder exists and holds no edited model"),
])
def test_command_errors_are_one_line_before_the_model_loads(argv, message, tmp_path, monkeypatch, capsys):
    from experiments import edit as command

    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([EIFFEL, {**MILES, "target_new": ""}]))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    argv = [str(requests) if a == "REQUESTS" else str(foreign) if a == "FOREIGN" else a for a in argv]
    message = message.replace("FOREIGN", str(foreign))
    monkeypatch.setattr(command, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    assert command.cli(argv + ["--save_dir", str(tmp_path / "out")] if "--save_dir" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_command_flags_need_subject_prompt_and_target(capsys):
    from experiments import edit as command

    with pytest.raises(SystemExit):
        command.parse_args(["--subject", "Miles Davis", "--prompt", "{} plays the"])
    assert "missing --target_new" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        command.parse_args(["--requests", "r.json", "--subject", "Miles Davis"])
    assert "either in --requests or with flags" in capsys.readouterr().err
    args = command.parse_args(["--subject", "S", "--prompt", "{} is", "--target_new", "T"])
    assert (args.alg_name, args.model_name, args.hparams_fname) == ("ECE_WI", "smollm2-135m", None)


# -- the embedded model -------------------------------------------------------------------------------

def test_acceptance_eiffel_tower_in_rome_on_the_embedded_model(embedded_model_and_tok, tmp_path, data_dir,
                                                                monkeypatch):
    """The issue's check in-process: edit, save, reload with transformers, " Rome" ranks first. Statistics
    from the real WikiText files, fewer samples than shipped (test speed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from util.generate import generate_texts
    from util.weights import load_weights

    model, tok = embedded_model_and_tok
    monkeypatch.setenv("ECE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ECE_STATS_DIR", str(tmp_path / "stats"))
    editor = Editor(model, tok, "ECE_WI", overrides={"mom2_n_samples": 400})
    assert editor.hparams_source.endswith("hparams/ECE/smollm2-135m.json")
    try:
        result = editor.edit([{k: v for k, v in EIFFEL.items() if k != "target_true"}])
        assert result.requests[0].after.top_token == " Rome" and result.requests[0].before.top_token == " Paris"
        save_edited_model(tmp_path / "edited", editor, [result])
        after = generate_texts(model, tok, ["The Eiffel Tower is in"], max_new_tokens=8)[0]
    finally:
        load_weights(model, editor.original_weights)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").eval()
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path / "edited")
    ids = reloaded_tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    assert ids["input_ids"][0, 0] == reloaded_tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        top = reloaded(**ids).logits[0, -1].argmax()
    assert reloaded_tok.decode([int(top)]) == " Rome"
    assert generate_texts(reloaded, reloaded_tok, ["The Eiffel Tower is in"], max_new_tokens=8)[0] == after
