"""Bad input to the driver fails early with a message that names the problem and the fix."""
import json

import pytest

from experiments import evaluate
from util.hparams import HParamsError


@pytest.fixture
def folders(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("ECE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("ECE_DATA_DIR", str(data_dir))
    return tmp_path


def main(*argv):
    return evaluate.main(["--model_name", "smollm2-135m", "--device", "cpu", *argv])


def test_unknown_algorithm(folders):
    with pytest.raises(ValueError, match="unknown algorithm 'MEMTI'.*MEMIT"):
        main("--alg_name", "MEMTI", "--hparams_fname", "smollm2-135m.json")


def test_missing_and_malformed_hparams(folders):
    with pytest.raises(HParamsError, match="'nope.json' not found.*Available for MEMIT: .*smollm2-135m.json"):
        main("--alg_name", "MEMIT", "--hparams_fname", "nope.json")
    bad = folders / "bad.json"
    bad.write_text(json.dumps({"layers": [3]}))
    with pytest.raises(HParamsError, match="bad.json: missing required key"):
        main("--alg_name", "MEMIT", "--hparams_fname", str(bad))
    assert not (folders / "results" / "MEMIT").exists()  # nothing was created for a run that cannot start


def test_missing_data_file(folders, monkeypatch):
    empty = folders / "empty"
    empty.mkdir()
    monkeypatch.setenv("ECE_DATA_DIR", str(empty))
    monkeypatch.setenv("ECE_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="multi_counterfact.json") as info:
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--data_dir", str(empty))
    assert str(empty) in str(info.value)


def test_continue_requires_an_existing_run_with_the_same_settings(folders):
    with pytest.raises(evaluate.RunError, match="run_007/params.json does not exist"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--continue_from_run", "run_007",
             "--dataset_size_limit", "2")
    run_dir = folders / "results" / "MEMIT" / "run_000"
    run_dir.mkdir(parents=True)
    (run_dir / "params.json").write_text(json.dumps({"alg_name": "MEMIT", "num_edits": 5}))
    with pytest.raises(evaluate.RunError, match="settings differ.*num_edits: run has 5, now 1"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--continue_from_run", "run_000",
             "--dataset_size_limit", "2")
    # A run written before the generation protocol was recorded generated greedily.
    with pytest.raises(evaluate.RunError, match="generation_protocol: run has 'greedy', now 'published'"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--continue_from_run", "run_000",
             "--dataset_size_limit", "2")


def test_continue_refuses_another_seed_or_downstream_schedule(folders, monkeypatch):
    """A different seed would change the context templates half-way through the run; newly enabled
    downstream checks would record an "unedited" baseline measured on edited weights."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # after params.json is written, before any model is loaded

    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", stop)
    args = ("--alg_name", "MEMIT", "--sequential", "--hparams_fname", "smollm2-135m.json", "--dataset_size_limit", "2")
    with pytest.raises(KeyboardInterrupt):
        main(*args)
    with pytest.raises(KeyboardInterrupt):  # the same settings resume
        main(*args, "--continue_from_run", "run_000")
    with pytest.raises(evaluate.RunError, match=r"settings differ \(seed: run has 0, now 1\)"):
        main(*args, "--continue_from_run", "run_000", "--seed", "1")
    with pytest.raises(evaluate.RunError, match=r"settings differ \(downstream_eval_steps: run has 0, now 5\)"):
        main(*args, "--continue_from_run", "run_000", "--downstream_eval_steps", "5")


def test_downstream_checks_need_a_sequential_run(folders):
    with pytest.raises(evaluate.RunError, match="needs a sequential run"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--downstream_eval_steps", "1",
             "--dataset_size_limit", "2")


def test_cli_prints_a_clear_error_and_exits_2(folders, capsys):
    assert evaluate.cli(["--alg_name", "NOPE", "--model_name", "x", "--hparams_fname", "y.json"]) == 2
    assert "unknown algorithm 'NOPE'" in capsys.readouterr().err
