"""scripts/device_measure.sh and what it needs, on the CPU: the random-weight models at the paper's
architectures (util.random_models), the benchmark on them with stopping disabled, the summary, and the
script itself end to end on tiny widths, so that it is known to run on the first GPU it meets."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from util.errors import SettingError
from util.paths import REPO_ROOT
from util.random_models import PAPER_ARCHITECTURES, build_config, parse_random_model_name

SCRIPT = REPO_ROOT / "scripts" / "device_measure.sh"
TINY_GPT2 = "random:gpt2-xl?hidden=32&mlp=64&heads=2"
TINY_LLAMA = "random:llama3-8b?hidden=64&mlp=128&heads=4&kv_heads=2"
NO_STOPPING = "v_num_grad_steps=3:v_stop_loss=0:v_stop_most_probable_steps=null"
LOCAL_STATS = "mom2_dataset=wikitext:mom2_keys_per_dimension=10:mom2_sample_length=64"


def parameter_count_on_meta(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_paper_configurations_have_the_published_sizes():
    gpt2 = build_config(PAPER_ARCHITECTURES["gpt2-xl"])
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_inner, gpt2.n_head, gpt2.vocab_size, gpt2.n_positions) == (
        48, 1600, 6400, 25, 50257, 1024)
    llama = build_config(PAPER_ARCHITECTURES["llama3-8b"])
    assert (llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size, llama.num_attention_heads,
            llama.num_key_value_heads, llama.vocab_size) == (32, 4096, 14336, 32, 8, 128256)
    assert llama.rope_parameters["rope_theta"] == 500000.0 and not llama.tie_word_embeddings
    # The published parameter counts: GPT-2 XL 1.558B, Meta-Llama-3-8B 8.030B.
    assert parameter_count_on_meta(gpt2) == 1_557_611_200
    assert parameter_count_on_meta(llama) == 8_030_261_248


def test_random_model_has_the_requested_shape_and_seeded_weights():
    from util.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(TINY_LLAMA + "&layers=3", device="cpu", dtype="bfloat16")
    attention = model.model.layers[0].self_attn
    assert len(model.model.layers) == 3 and model.config.hidden_size == 64
    assert attention.k_proj.weight.shape == (2 * 16, 64)  # 2 KV heads of 64 / 4 = 16: grouped-query attention
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 128)
    assert model.lm_head.weight.shape == (128256, 64) and model.lm_head.weight.dtype == torch.bfloat16
    assert len(tok) <= 128256 and tok.pad_token is not None
    assert not any(p.requires_grad for p in model.parameters())
    again, _ = load_model_and_tokenizer(TINY_LLAMA + "&layers=3", device="cpu", dtype="bfloat16")
    other, _ = load_model_and_tokenizer(TINY_LLAMA + "&layers=3&seed=1", device="cpu", dtype="bfloat16")
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


@pytest.mark.parametrize("name, message", [
    ("random:gpt3", "unknown random architecture"),
    ("random:gpt2-xl?layer=4", "bad random-model option"),
    ("random:gpt2-xl?layers=four", "must be an integer"),
    ("random:gpt2-xl?hidden=30&heads=4", "not a multiple of heads"),
    ("random:llama3-8b?heads=4&kv_heads=3&hidden=64", "not a multiple of kv_heads"),
])
def test_bad_random_model_names_are_refused(name, message):
    with pytest.raises(SettingError, match=message):
        parse_random_model_name(name)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    from util.models import load_model_and_tokenizer

    with pytest.raises(SettingError, match="more than the vocabulary"):
        load_model_and_tokenizer(TINY_LLAMA + "&vocab=1000", device="cpu", dtype="float32")


def test_the_tokenizer_option_reads_a_local_folder(tmp_path):
    from util.model_sources import embedded_model_dir
    from util.random_models import load_random_tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(embedded_model_dir("smollm2-135m")) / name, folder / name)
    tok = load_random_tokenizer(f"random:gpt2-xl?tokenizer={folder}")
    assert len(tok) == 49152 and tok("Paris").input_ids[0] == tok.bos_token_id  # SmolLM2's document start


def test_summary_labels_and_ratios():
    from scripts.device_measure_summary import method_label, ratios

    assert method_label("MEMIT:z_prefix_cache=false:z_below_cache=false:v_num_grad_steps=10") == "MEMIT (published cost)"
    assert method_label("ECE_WI:v_stop_loss=0:mom2_dataset=wikitext:neuron_threshold=0.6") == "ECE_WI neuron_threshold=0.6"
    rows = [{"model": "m", "method": "MEMIT", "round_seconds": 12.0, "round_seconds_without_statistics": 8.0},
            {"model": "m", "method": "ECE_WI", "round_seconds": 3.0, "round_seconds_without_statistics": 2.0}]
    assert ratios(rows) == [{"model": "m", "memit_over_ece_wi": 4.0, "without_statistics": 4.0}]


@pytest.mark.parametrize("model_name, hparams_file, layers", [
    (TINY_GPT2, "gpt2-xl.json", 48), (TINY_LLAMA, "Llama3-8B.json", 32)])
def test_benchmark_runs_memit_and_ece_on_a_random_model_with_the_same_steps(
        model_name, hparams_file, layers, stats_dir, data_dir, tmp_path):
    from experiments import benchmark

    out = tmp_path / "bench.json"
    result = benchmark.main([
        "--model_name", model_name, "--device", "cpu", "--dtype", "float32", "--ds_name", "cf",
        "--num_edits", "3", "--rounds", "1", "--data_dir", str(data_dir), "--out", str(out),
        "--algs", f"MEMIT:{NO_STOPPING}:{LOCAL_STATS},ECE_WI:{NO_STOPPING}:{LOCAL_STATS}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["random_weights"] is True
    rows = {row["alg"].split(":")[0]: row for row in result["rows"]}
    assert set(rows) == {"MEMIT", "ECE_WI"}
    for name, row in rows.items():
        assert row["hparams"]["file"].endswith(f"{'ECE' if name == 'ECE_WI' else 'MEMIT'}/{hparams_file}")
        assert row["mean_target_steps"] == 2  # 3 steps: 2 updates and a last scoring pass, for every fact
        assert row["round_seconds"] > 0 and row["z_seconds"] > 0 and row["update_seconds"] > 0
        assert row["model_shape"]["layers"] == layers and row["model_shape"]["dtype"] == "float32"
        assert row["efficacy"] is None and row["specificity"] is None  # random weights: nothing to score
    # The statistics come from the local WikiText, with keys_per_dimension in the cache file's name.
    assert any("keys_per_dim" in str(p) for p in stats_dir.rglob("*.pt"))
    # MEMIT computed them; ECE_WI read them from the run's context.
    assert rows["MEMIT"]["stage_seconds"]["statistics"] > rows["ECE_WI"]["stage_seconds"]["statistics"]


def run_script(tmp_path, data_dir, **env):
    environment = {**os.environ, "OUT": str(tmp_path / "out"), "ECE_DATA_DIR": str(data_dir),
                   "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=300)


def copy_embedded_tokenizer(folder: Path) -> Path:
    """The embedded model's tokenizer files, without its weights, in ``folder`` (what a device's first call has)."""
    from util.model_sources import embedded_model_dir

    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(embedded_model_dir("smollm2-135m")) / name, folder / name)
    return folder


def step_verdicts(out) -> dict:
    """``{step: verdict}`` from status.txt (its first line holds the settings)."""
    lines = (out / "status.txt").read_text().splitlines()
    assert lines[0].startswith("settings: ")
    return dict(line.split(": ", 1) for line in lines[1:])


def assert_sendable(out) -> None:
    """What a device machine sends back: at most 8 files, named in letters, digits, '.', '_' and '-'."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files


def assert_paper_runs(out, expected_steps: int) -> None:
    for model, layers in (("gpt2-xl", 48), ("llama3-8b", 32)):
        steps = set()
        for method in ("MEMIT", "ECE_WI"):
            result = json.loads((out / f"paper_{model}_{method}.json").read_text())
            row, = result["rows"]
            assert result["random_weights"] and row["model_shape"]["layers"] == layers
            assert row["model_shape"]["dtype"] == "bfloat16" and row["round_seconds"] > 0
            steps.add(row["mean_target_steps"])
        assert steps == {expected_steps}  # the same for both methods: nothing stopped early


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_script_refuses_an_unknown_scale(tmp_path, data_dir):
    result = run_script(tmp_path, data_dir, SCALE="huge")
    assert result.returncode == 2 and "SCALE must be paper or tiny" in result.stderr


def test_script_measures_nothing_when_its_time_budget_cannot_hold_the_check(tmp_path, data_dir):
    """With 15 s in all (10 kept for the summary) not even the check can start: the script says so and fails."""
    result = run_script(tmp_path, data_dir, SCALE="tiny", DEVICE="cpu", TOTAL_S="15")
    assert result.returncode == 1 and "nothing measured" in result.stdout
    assert step_verdicts(tmp_path / "out")["check"].startswith("skipped")
    assert not list((tmp_path / "out").glob("*.json"))


def test_script_fails_when_the_device_is_missing(tmp_path, data_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_script(tmp_path, data_dir, SCALE="tiny", DEVICE="cuda", TOTAL_S="45")
    verdicts = step_verdicts(tmp_path / "out")
    assert result.returncode == 1 and "torch sees no GPU" in result.stdout
    assert list(verdicts) == ["check"] and verdicts["check"].startswith("FAILED rc=1")


def test_script_measures_paper_scale_with_only_the_tokenizer_files(tmp_path, data_dir):
    """A device machine receives at most 64 MiB: the embedded tokenizer's files, not its weights. Step 1 is
    skipped (and the script fails), the random models are measured all the same."""
    models = tmp_path / "models"
    copy_embedded_tokenizer(models / "smollm2-135m")
    result = run_script(tmp_path, data_dir, SCALE="tiny", DEVICE="cpu", TOTAL_S="90", ECE_MODELS_DIR=str(models))
    out = tmp_path / "out"
    verdicts = step_verdicts(out)
    assert result.returncode == 1, result.stdout[-3000:]
    assert verdicts["bench_smollm2-135m"].startswith("skipped, the embedded model's weights are not here")
    assert all(verdicts[f"paper_{m}_{a}"].startswith("ok") for m in ("gpt2-xl", "llama3-8b") for a in ("MEMIT", "ECE_WI"))
    assert_paper_runs(out, expected_steps=2)
    assert_sendable(out)


def test_script_refuses_an_unknown_step(tmp_path, data_dir):
    result = run_script(tmp_path, data_dir, SCALE="tiny", STEPS="paper evaluate")
    assert result.returncode == 2 and "STEPS holds bench and/or paper, not 'evaluate'" in result.stderr


def test_script_runs_only_the_paper_steps_when_asked(tmp_path, data_dir):
    """STEPS=paper, a device's first call (the embedded weights still on their way, the tokenizer in a folder of
    its own): the paper-scale runs, no benchmark, and a success."""
    tokenizer = copy_embedded_tokenizer(tmp_path / "tokenizer")
    result = run_script(tmp_path, data_dir, SCALE="tiny", DEVICE="cpu", TOTAL_S="90", STEPS="paper",
                        RANDOM_TOKENIZER=str(tokenizer), ECE_MODELS_DIR=str(tmp_path / "no_models"))
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-3000:]
    assert list(step_verdicts(out)) == ["check"] + [f"paper_{m}_{a}" for m in ("gpt2-xl", "llama3-8b")
                                                     for a in ("MEMIT", "ECE_WI")]
    assert not (out / "bench_smollm2-135m.json").exists()
    assert_paper_runs(out, expected_steps=2)
    assert_sendable(out)


@pytest.mark.slow  # step 1 loads the embedded model
def test_script_cuts_a_step_at_the_deadline_and_skips_the_rest(tmp_path, data_dir):
    """TOTAL_S=30 leaves step 1 (30-40 s on a CPU) under 20 s: its timeout ends it, the paper-scale
    steps are skipped, and the script fails."""
    result = run_script(tmp_path, data_dir, SCALE="tiny", DEVICE="cpu", TOTAL_S="30")
    verdicts = step_verdicts(tmp_path / "out")
    assert result.returncode == 1
    assert verdicts["check"].startswith("ok") and verdicts["bench_smollm2-135m"].startswith("TIMED OUT")
    assert [v.startswith("skipped") for k, v in verdicts.items() if k.startswith("paper_")] == [True] * 4


@pytest.mark.slow  # step 1 loads the embedded model
def test_script_runs_every_step_at_tiny_scale_on_the_cpu(tmp_path, data_dir):
    """The whole script on tiny widths within 180 s of its own budget (step 1 took 30-52 s on the 2-core CPU,
    the rest about 25 s): a step that ran over would be cut by its timeout or skipped, and the script would fail."""
    from scripts import device_measure_summary

    result = run_script(tmp_path, data_dir, SCALE="tiny", DEVICE="cpu", TOTAL_S="180")
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    verdicts = step_verdicts(out)
    assert len(verdicts) == 6 and all(v.startswith("ok after") for v in verdicts.values())
    bench = json.loads((out / "bench_smollm2-135m.json").read_text())
    assert [row["alg"].split(":")[0] for row in bench["rows"]] == ["MEMIT", "MEMIT", "ECE_WI", "AlphaEdit"]
    assert bench["rows"][0]["hparams_overrides"]["z_prefix_cache"] is False
    assert_paper_runs(out, expected_steps=2)  # PAPER_STEPS=3 at tiny scale
    assert_sendable(out)
    table = (out / "summary.txt").read_text()
    assert "MEMIT (published cost)" in table and "random" in table
    assert device_measure_summary.main([str(out), "--json", str(tmp_path / "summary.json")]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rows"]) == 8
    assert [r["model"] for r in summary["ratios"]] == ["smollm2-135m", "random:gpt2-xl", "random:llama3-8b"]
    for row in summary["rows"]:
        if row["random_weights"]:  # 3 steps measured, scaled to the published 20 / 25
            published = 20 if row["model"] == "random:gpt2-xl" else 25
            assert row["target_seconds_at_published_steps"] == pytest.approx(row["target_seconds"] * (published - 1) / 2)


INPUTS_SCRIPT = REPO_ROOT / "scripts" / "device_inputs.sh"


@pytest.mark.slow
def test_device_inputs_travel_in_two_halves_and_unpack_to_the_same_model(tmp_path, data_dir, embedded_model_and_tok):
    """scripts/device_inputs.sh: the embedded model's GGUF in two halves that each fit a device call with the data,
    joined and checked on the 'device' (fresh model and data folders) into a model that computes what the
    embedded one does, with the first part kept outside the repository between the calls; a missing or damaged
    half is refused with what to do."""
    inbox = tmp_path / "in"
    env = dict(os.environ, DEVICE_IN=str(inbox), DATA_SOURCE=str(data_dir), DATA_FILES_1="wikitext",
               DATA_FILES_2="glue", PYTHON=sys.executable)
    run = lambda *args, **extra: subprocess.run(["bash", str(INPUTS_SCRIPT), *args], env=dict(env, **extra),
                                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    refused = run("pack", DATA_FILES_2="glue heldout")
    assert refused.returncode == 2 and "held-out data is never carried" in refused.stderr
    assert not inbox.exists()  # refused before anything was made
    packed = run("pack")
    assert packed.returncode == 0, packed.stderr[-2000:]
    halves = [inbox / "1" / "gguf.part", inbox / "2" / "gguf.part"]
    folder_bytes = [sum(f.stat().st_size for f in (inbox / part).rglob("*") if f.is_file()) for part in "12"]
    assert all(size < 60 * 2**20 for size in folder_bytes)  # with the 2 MiB repository, under a call's 64 MiB
    assert sum(h.stat().st_size for h in halves) > 64 * 2**20  # the whole would not fit one call
    assert len(list((inbox / "1").glob("gguf-*.whl"))) == 1
    assert sorted(p.name for p in (inbox / "1" / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]

    device = dict(ECE_MODELS_DIR=str(tmp_path / "device_models"), ECE_DATA_DIR=str(tmp_path / "device_data"),
                  STASH=str(tmp_path / "stash"))
    first = run("receive", "1", **device)  # the first call's data is there for the paper-scale runs
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "device_data").iterdir()) == ["wikitext"]
    # As seen on a device: the second call's carry leaves no .device_in/1 in the repository; the stash has it.
    shutil.rmtree(inbox / "1")
    cold = run("unpack", **dict(device, STASH=str(tmp_path / "fresh_machine")))
    assert cold.returncode == 2 and "make both calls again" in cold.stderr
    good = halves[1].read_bytes()
    halves[1].write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    damaged = run("unpack", **device)
    assert damaged.returncode == 2 and "does not match its checksum" in damaged.stderr
    halves[1].write_bytes(good)
    unpacked = run("unpack", **device)
    assert unpacked.returncode == 0, unpacked.stderr[-2000:]
    assert (tmp_path / "device_data" / "wikitext" / "wiki.test.raw").read_bytes() == \
        (data_dir / "wikitext" / "wiki.test.raw").read_bytes()
    assert sorted(p.name for p in (tmp_path / "device_data").iterdir()) == ["glue", "wikitext"]

    from transformers import AutoModelForCausalLM

    model, tok = embedded_model_and_tok
    copy_ = AutoModelForCausalLM.from_pretrained(tmp_path / "device_models" / "smollm2-135m", dtype=torch.float32)
    ids = tok("The Eiffel Tower is located in", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(copy_(**ids).logits, model(**ids).logits, atol=1e-4)


SESSION_SCRIPT = REPO_ROOT / "scripts" / "device_session.sh"


def test_session_script_refuses_a_call_without_its_seconds():
    result = subprocess.run(["bash", str(SESSION_SCRIPT), "2"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.slow  # loads the embedded model and edits it
def test_device_session_two_calls_on_a_fresh_machine(tmp_path, data_dir):
    """scripts/device_session.sh on the CPU, tiny: call 1 measures the paper-scale runs with only part 1 of the
    model; call 2, with part 1 gone from the repository as on a device, joins the model, benchmarks it and runs
    a sequential run, whose folder comes back packed without its resumable state; each call's OUT is sendable."""
    import tarfile

    inbox = tmp_path / "in"
    env = dict(os.environ, DEVICE_IN=str(inbox), DATA_SOURCE=str(data_dir), PYTHON=sys.executable,
               STASH=str(tmp_path / "stash"), ECE_MODELS_DIR=str(tmp_path / "device_models"),
               ECE_DATA_DIR=str(tmp_path / "device_data"), ECE_STATS_DIR=str(tmp_path / "stats"),
               SCALE="tiny", DEVICE="cpu", OMP_NUM_THREADS="1")
    packed = subprocess.run(["bash", str(INPUTS_SCRIPT), "pack"], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert packed.returncode == 0, packed.stderr[-2000:]

    first = subprocess.run(["bash", str(SESSION_SCRIPT), "1", "150"], env=dict(env, OUT=str(tmp_path / "out1")),
                           capture_output=True, text=True, timeout=200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert_paper_runs(tmp_path / "out1", expected_steps=2)
    assert_sendable(tmp_path / "out1")

    shutil.rmtree(inbox / "1")
    second_env = dict(env, OUT=str(tmp_path / "out2"), RESULTS=str(tmp_path / "results"), BENCH_METHODS="ECE_WI",
                      METHODS="ECE_WI", EDITS="2", ROUND="1", DOWNSTREAM_STEPS="0", OVERRIDES="mom2_n_samples=20")
    second = subprocess.run(["bash", str(SESSION_SCRIPT), "2", "280"], env=second_env, capture_output=True,
                            text=True, timeout=330)
    out = tmp_path / "out2"
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    assert step_verdicts(out)["bench_smollm2-135m"].startswith("ok")
    assert [r["alg"] for r in json.loads((out / "bench_smollm2-135m.json").read_text())["rows"]] == \
        ["ECE_WI:v_num_grad_steps=2:mom2_n_samples=20"]
    with tarfile.open(out / "sequential_runs.tgz") as packed_runs:
        names = packed_runs.getnames()
    run_files = [n for n in names if n.startswith("results/ECE_WI/run_000/")]
    assert sum("_edits-case_" in n for n in run_files) == 2
    assert "results/ECE_WI/run_000/params.json" in run_files
    assert not any(n.endswith("sequential_state.pt") for n in names)
    assert_sendable(out)
