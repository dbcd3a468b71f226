"""Bad input to the driver fails early with a message that names the problem and the fix; only the project's
own errors become that message (other exceptions are bugs and keep their traceback); the hparams overrides,
the compatibility-key warning, the removed switches and the arguments every script shares."""
import json
import logging

import pytest

from experiments import driver, evaluate
from util.cli import run_script
from util.errors import ECEError, SettingError
from util.hparams import HParamsError
from util.paths import get_paths


@pytest.fixture
def folders(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("ECE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("ECE_DATA_DIR", str(data_dir))
    return tmp_path


def main(*argv):
    return evaluate.main(["--model_name", "smollm2-135m", "--device", "cpu", *argv])


def test_unknown_algorithm(folders):
    with pytest.raises(SettingError, match="unknown algorithm 'MEMTI'.*MEMIT"):
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
    with pytest.raises(driver.RunError, match="run_007/params.json does not exist"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--continue_from_run", "run_007",
             "--dataset_size_limit", "2")
    run_dir = folders / "results" / "MEMIT" / "run_000"
    run_dir.mkdir(parents=True)
    (run_dir / "params.json").write_text(json.dumps({"alg_name": "MEMIT", "num_edits": 5}))
    with pytest.raises(driver.RunError, match="settings differ.*num_edits: run has 5, now 1"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--continue_from_run", "run_000",
             "--dataset_size_limit", "2")
    # A run written before the generation protocol was recorded generated greedily.
    with pytest.raises(driver.RunError, match="generation_protocol: run has 'greedy', now 'published'"):
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
    with pytest.raises(driver.RunError, match=r"settings differ \(seed: run has 0, now 1\)"):
        main(*args, "--continue_from_run", "run_000", "--seed", "1")
    with pytest.raises(driver.RunError, match=r"settings differ \(downstream_eval_steps: run has 0, now 5\)"):
        main(*args, "--continue_from_run", "run_000", "--downstream_eval_steps", "5")


def test_downstream_checks_need_a_sequential_run(folders):
    with pytest.raises(driver.RunError, match="needs a sequential run"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--downstream_eval_steps", "1",
             "--dataset_size_limit", "2")


def test_relation_clusters_need_records_with_a_relation_id(folders):
    """EasyEdit's records have no relation_id: ECE's cluster_by "relation" is refused before the run begins."""
    with pytest.raises(ECEError, match=r"request 0 .*no relation_id.*use cluster_by \"neurons\""):
        main("--alg_name", "ECE_WI", "--hparams_fname", "smollm2-135m.json", "--ds_name", "cf_easyedit",
             "--dataset_size_limit", "2", "--hparams", "cluster_by=relation")
    assert not (folders / "results" / "ECE_WI").exists()


def test_cli_prints_a_clear_error_and_exits_2(folders, capsys):
    assert evaluate.cli(["--alg_name", "NOPE", "--model_name", "x", "--hparams_fname", "y.json"]) == 2
    err = capsys.readouterr().err
    assert "unknown algorithm 'NOPE'" in err and "Traceback" not in err


# -- errors: the project's own one line, anything else a traceback ----------------------------------


def test_error_types_share_one_base():
    from dsets import DataFileNotFoundError, DataFormatError
    from dsets.glue import DownstreamDataNotFoundError
    from summarize import SummarizeError
    from util.models import ModelNotFoundError

    for error in (driver.RunError, HParamsError, ModelNotFoundError, DataFileNotFoundError, DataFormatError,
                  DownstreamDataNotFoundError, SummarizeError):
        assert issubclass(error, ECEError), error
    assert issubclass(HParamsError, ValueError) and issubclass(ModelNotFoundError, ValueError)
    assert issubclass(DataFileNotFoundError, FileNotFoundError) and issubclass(DataFormatError, ValueError)


def test_internal_value_error_keeps_its_traceback(folders, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(evaluate, "load_records", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        evaluate.cli(["--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json"])
    monkeypatch.setattr(evaluate, "load_records", lambda *a: (_ for _ in ()).throw(FileNotFoundError("bug.txt")))
    with pytest.raises(FileNotFoundError, match="bug.txt"):
        evaluate.cli(["--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json"])


def test_project_error_is_one_line_and_verbose_prints_the_traceback(folders, capsys):
    argv = ["--alg_name", "MEMIT", "--hparams_fname", "nope.json"]
    assert evaluate.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hyperparameter file 'nope.json' not found") and "Traceback" not in err
    assert evaluate.cli(argv + ["-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "HParamsError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: hyperparameter file 'nope.json' not found")


def test_interrupt_gives_status_130_with_a_message(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_script(interrupted, [], "interrupted: resume later") == 130
    assert capsys.readouterr().err.strip() == "interrupted: resume later"
    with pytest.raises(KeyboardInterrupt):
        run_script(interrupted, [])


# -- --hparams overrides ------------------------------------------------------------------------------


def _stop_before_the_model(monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # after the run folder is written, before any model is loaded

    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", stop)


def test_hparams_overrides_are_applied_and_recorded(folders, monkeypatch):
    _stop_before_the_model(monkeypatch)
    args = ("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--dataset_size_limit", "2")
    with pytest.raises(KeyboardInterrupt):
        main(*args, "--hparams", "v_lr=0.25", "layers=[3, 4]", "mom2_dtype=float64")
    run_dir = folders / "results" / "MEMIT" / "run_000"
    params = json.loads((run_dir / "params.json").read_text())
    assert params["hparams_overrides"] == {"v_lr": 0.25, "layers": [3, 4], "mom2_dtype": "float64"}
    assert (params["hparams"]["v_lr"], params["hparams"]["layers"], params["hparams"]["mom2_dtype"]) == (
        0.25, [3, 4], "float64")
    copied = json.loads((run_dir / "hparams.json").read_text())
    assert (copied["v_lr"], copied["layers"], copied["mom2_dtype"]) == (0.25, [3, 4], "float64")
    shipped = json.loads((get_paths().hparams_dir / "MEMIT" / "smollm2-135m.json").read_text())
    assert {k: v for k, v in copied.items() if k not in ("v_lr", "layers", "mom2_dtype")} == {
        k: v for k, v in shipped.items() if k not in ("v_lr", "layers", "mom2_dtype")}

    with pytest.raises(KeyboardInterrupt):  # the same effective values resume
        main(*args, "--hparams", "v_lr=0.25", "layers=[3,4]", "mom2_dtype=float64", "--continue_from_run", "run_000")
    with pytest.raises(driver.RunError, match=r"settings differ \(hparams.v_lr: run has 0.25, now 0.5\)"):
        main(*args, "--hparams", "v_lr=0.5", "layers=[3,4]", "mom2_dtype=float64", "--continue_from_run", "run_000")
    with pytest.raises(driver.RunError, match=r"hparams.layers: run has \[3, 4\], now"):
        main(*args, "--hparams", "v_lr=0.25", "mom2_dtype=float64", "--continue_from_run", "run_000")

    # A run made before a hyperparameter existed ran with its default: it resumes with the default, not otherwise.
    params_file = run_dir / "params.json"
    params["hparams"].pop("z_compile")
    params_file.write_text(json.dumps(params))
    with pytest.raises(KeyboardInterrupt):
        main(*args, "--hparams", "v_lr=0.25", "layers=[3,4]", "mom2_dtype=float64", "--continue_from_run", "run_000")
    with pytest.raises(driver.RunError, match=r"hparams.z_compile: run has False, now True"):
        main(*args, "--hparams", "v_lr=0.25", "layers=[3,4]", "mom2_dtype=float64", "z_compile=true",
             "--continue_from_run", "run_000")


def test_bad_hparams_override_names_the_key(folders):
    with pytest.raises(HParamsError, match=r"unknown key\(s\) \['v_lrr'\]"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--hparams", "v_lrr=0.1")
    with pytest.raises(HParamsError, match="key 'v_lr' must be float, got 'fast'"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--hparams", "v_lr=fast")
    with pytest.raises(HParamsError, match="bad hyperparameter override 'v_lr'"):
        main("--alg_name", "MEMIT", "--hparams_fname", "smollm2-135m.json", "--hparams", "v_lr")
    assert not (folders / "results" / "MEMIT").exists()


def test_benchmark_specs_parse_overrides_as_evaluate_does():
    from util.hparams import parse_overrides

    assert driver.parse_algorithm_spec("MEMIT:z_prefix_cache=false:mom2_dtype=float64") == (
        "MEMIT", {"z_prefix_cache": False, "mom2_dtype": "float64"})
    assert parse_overrides(["z_prefix_cache=false", "mom2_dtype=float64"]) == {
        "z_prefix_cache": False, "mom2_dtype": "float64"}
    with pytest.raises(HParamsError, match="write key=value"):
        driver.parse_algorithm_spec("MEMIT:z_prefix_cache")


# -- compatibility-only hparams keys ------------------------------------------------------------------


def test_compatibility_keys_are_ignored_with_a_warning(caplog):
    from baselines.ft import FTHyperParams
    from baselines.memit import MEMITHyperParams
    from rome.rome_main import ROMEHyperParams

    hparams_dir = get_paths().hparams_dir
    memit = json.loads((hparams_dir / "MEMIT" / "smollm2-135m.json").read_text())
    clean = {k: v for k, v in memit.items() if k not in MEMITHyperParams.COMPATIBILITY_KEYS}
    with caplog.at_level(logging.WARNING, logger="util.hparams"):
        MEMITHyperParams.from_dict(clean, source="clean")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="util.hparams"):
        hp = MEMITHyperParams.from_dict({**clean, "layer_selection": "all", "lm_head_module": "lm_head"}, source="f")
    assert hp.layer_selection == "all"  # accepted and recorded, read by nothing
    assert sorted(r.getMessage() for r in caplog.records) == [
        "f: key 'layer_selection' is ignored by MEMITHyperParams (accepted only so that the published files load)",
        "f: key 'lm_head_module' is ignored by MEMITHyperParams (accepted only so that the published files load)",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="util.hparams"):
        ROMEHyperParams.from_json(hparams_dir / "ROME" / "smollm2-135m.json")
    assert "mlp_module_tmp" not in caplog.text  # ROME's target value is read at that module
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="util.hparams"):
        FTHyperParams.from_json(hparams_dir / "FT" / "gpt2-xl.json")
    for key in ("kl_factor", "ln_f_module", "mlp_module_tmp"):
        assert f"key '{key}' is ignored by FTHyperParams" in caplog.text


# -- removed switches and the arguments every script shares -------------------------------------------


@pytest.mark.parametrize("switch", ["--use_cache", "--conserve_memory"])
def test_removed_memit_switches_fail_with_the_reason(switch, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate.parse_args(["--alg_name", "MEMIT", "--hparams_fname", "h.json", switch])
    assert info.value.code == 2
    assert f"{switch} is not" in capsys.readouterr().err


def test_eval_batch_size_replaces_conserve_memory():
    args = evaluate.parse_args(["--alg_name", "MEMIT", "--hparams_fname", "h.json"])
    assert args.eval_batch_size == 64
    assert evaluate.parse_args(["--alg_name", "MEMIT", "--hparams_fname", "h.json", "--eval_batch_size", "8"]
                               ).eval_batch_size == 8


def test_no_kv_dir_or_remote_root_url():
    from util.paths import REPO_ROOT, get_paths

    assert not hasattr(get_paths(), "kv_dir") and not hasattr(get_paths(), "remote_root_url")
    text = (REPO_ROOT / "globals.yml").read_text()
    assert "KV_DIR" not in text and "REMOTE_ROOT_URL" not in text


def test_every_script_takes_the_same_model_arguments():
    import summarize
    from experiments import benchmark, edit_drift, profile_targets

    common = ["--model_name", "gpt2", "--dtype", "bfloat16", "--device", "cpu", "-v"]
    parsed = [
        evaluate.parse_args(["--alg_name", "MEMIT", "--hparams_fname", "h.json", *common]),
        benchmark.parse_args(["--algs", "MEMIT", *common]),
        edit_drift.parse_args(["--run_dirs", "x", *common]),
        profile_targets.parse_args(common),
    ]
    for args in parsed:
        assert (args.model_name, args.dtype, args.device, args.verbose) == ("gpt2", "bfloat16", "cpu", True)
    defaults = [evaluate.parse_args(["--alg_name", "MEMIT", "--hparams_fname", "h.json"]),
                benchmark.parse_args(["--algs", "MEMIT"]), edit_drift.parse_args(["--run_dirs", "x"]),
                profile_targets.parse_args([])]
    for args in defaults:
        assert (args.model_name, args.dtype, args.device, args.verbose) == ("smollm2-135m", "auto", None, False)
    assert summarize.build_parser().parse_args(["--dir_name", "MEMIT", "-v"]).verbose
