"""summarize.py: per-case metrics from hand-chosen NLLs / token correctness, aggregation, stages, run
selection, error messages, the CLI (table and JSON) and the downstream table and plot."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import summarize as sm  # noqa: E402


# ------------------------------------------------------------------ helpers


def nll(new: float, true: float) -> dict:
    return {"target_new": new, "target_true": true}


def cf_stage(rewrite, paraphrase, neighborhood, **extra) -> dict:
    return {
        "rewrite_prompts_probs": [nll(*p) for p in rewrite],
        "paraphrase_prompts_probs": [nll(*p) for p in paraphrase],
        "neighborhood_prompts_probs": [nll(*p) for p in neighborhood],
        **extra,
    }


def write_case(run_dir: Path, case_id, group, time: float, num_edits: int = 2, **stages) -> Path:
    record = {
        "case_id": case_id,
        "grouped_case_ids": group,
        "num_edits": num_edits,
        "requested_rewrite": {"prompt": "{} plays", "subject": f"S{case_id}",
                              "target_new": {"str": "x"}, "target_true": {"str": "y"}},
        "time": time,
        **stages,
    }
    path = run_dir / f"{num_edits}_edits-case_{case_id}.json"
    path.write_text(json.dumps(record))
    return path


def write_params(run_dir: Path, ds_name: str = "mcf", sequential: bool = False, num_edits: int = 2) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.json").write_text(json.dumps({
        "alg_name": "MEMIT", "model_name": "gpt2-xl", "ds_name": ds_name, "num_edits": num_edits,
        "sequential": sequential, "hparams": {"layers": [13, 14]},
    }))


def ci(values: list[float]) -> tuple[float, float]:
    """Mean and 1.96 * sample-std / sqrt(n), in percent, computed here without numpy."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return 100 * mean, 100 * 1.96 * math.sqrt(var) / math.sqrt(n)


E = math.exp

# Three CounterFact cases with hand-chosen NLLs (post stage). Per case:
#   case 0: efficacy 1, generalization 1/2, specificity 1
#   case 1: efficacy 0 (tie 1.0 vs 1.0 counts as failure), generalization 0, specificity 1/2
#   case 2: efficacy 1, generalization 1, specificity 0 (tie counts as failure)
CF_POST = {
    0: cf_stage([(0.1, 2.0)], [(0.5, 1.0), (2.0, 1.0)], [(3.0, 1.0)], ngram_entropy=6.0, reference_score=None),
    1: cf_stage([(1.0, 1.0)], [(2.0, 1.0), (3.0, 1.0)], [(1.0, 3.0), (4.0, 2.0)],
                ngram_entropy=6.2, reference_score=None),
    2: cf_stage([(0.2, 0.4)], [(0.3, 3.0)], [(1.5, 1.5)], ngram_entropy=5.8, reference_score=None),
}
EFF = [1.0, 0.0, 1.0]
GEN = [0.5, 0.0, 1.0]
SPEC = [1.0, 0.5, 0.0]
EFF_MAG = [E(-0.1) - E(-2.0), 0.0, E(-0.2) - E(-0.4)]
GEN_MAG = [((E(-0.5) - E(-1.0)) + (E(-2.0) - E(-1.0))) / 2, ((E(-2.0) - E(-1.0)) + (E(-3.0) - E(-1.0))) / 2,
           E(-0.3) - E(-3.0)]
SPEC_MAG = [E(-1.0) - E(-3.0), ((E(-3.0) - E(-1.0)) + (E(-2.0) - E(-4.0))) / 2, 0.0]


@pytest.fixture
def cf_results(tmp_path: Path) -> Path:
    """results/MEMIT/run_000: 3 CounterFact cases in 2 rounds ({0, 1}: 2 s, {2}: 5 s), pre + post."""
    run = tmp_path / "MEMIT" / "run_000"
    write_params(run)
    pre = cf_stage([(3.0, 0.5)], [(3.0, 0.5)], [(3.0, 0.5)])  # unedited: efficacy 0, specificity 1
    write_case(run, 0, [0, 1], 2.0, pre=pre, post=CF_POST[0])
    write_case(run, 1, [0, 1], 2.0, pre=pre, post=CF_POST[1])
    write_case(run, 2, [2], 5.0, pre=pre, post=CF_POST[2])
    return tmp_path


# ------------------------------------------------------------------ per-case metrics


def test_counterfact_case_metrics_exact():
    m = sm.counterfact_case_metrics(CF_POST[1])
    assert m["efficacy"] == 0.0  # a tie is not a success
    assert m["generalization"] == 0.0
    assert m["specificity"] == 0.5
    assert m["efficacy_magnitude"] == pytest.approx(0.0)
    assert m["generalization_magnitude"] == pytest.approx(GEN_MAG[1])
    assert m["specificity_magnitude"] == pytest.approx(SPEC_MAG[1])
    assert m["fluency"] == 6.2 and m["consistency"] is None


def test_zsre_case_metrics_mean_of_prompt_means():
    stage = {
        "rewrite_prompts_correct": [[True, False, True, True]],
        # per-prompt means 1 and 0 -> 0.5 (pooled tokens would give 0.25)
        "paraphrase_prompts_correct": [[True], [False, False, False]],
        "neighborhood_prompts_correct": [[True, True], [True, False]],
    }
    m = sm.zsre_case_metrics(stage)
    assert m == {"efficacy": 0.75, "generalization": 0.5, "specificity": 0.75,
                 # written before the free-generation metric existed
                 "efficacy_free": None, "generalization_free": None, "specificity_free": None}


# ------------------------------------------------------------------ aggregation


def test_counterfact_run_numbers(cf_results: Path):
    (run,) = sm.summarize("MEMIT", results_dir=cf_results)
    assert run["dataset"] == "counterfact"
    assert run["n_cases"] == 3 and run["n_rounds"] == 2
    assert run["time_per_round"] == pytest.approx(3.5)
    assert run["time_total"] == pytest.approx(7.0)
    post = run["stages"]["post"]
    assert post["n_cases"] == 3
    for key, per_case in (("efficacy", EFF), ("generalization", GEN), ("specificity", SPEC),
                          ("efficacy_magnitude", EFF_MAG), ("generalization_magnitude", GEN_MAG),
                          ("specificity_magnitude", SPEC_MAG)):
        mean, half = ci(per_case)
        assert post[key]["mean"] == pytest.approx(mean), key
        assert post[key]["ci95"] == pytest.approx(half), key
        assert post[key]["low"] == pytest.approx(mean - half), key
        assert post[key]["high"] == pytest.approx(mean + half), key
        assert post[key]["n"] == 3
    # efficacy 66.67 +- 65.33 (std 57.74), generalization 50, specificity 50
    assert post["efficacy"]["mean"] == pytest.approx(200 / 3)
    assert post["efficacy"]["ci95"] == pytest.approx(1.96 * 100 * math.sqrt(1 / 3) / math.sqrt(3))
    assert post["score"] == pytest.approx(3 / (3 / 200 + 1 / 50 + 1 / 50))
    assert post["fluency"]["mean"] == pytest.approx(600.0)  # ngram_entropy x100 (MEMIT table scale)
    assert post["consistency"] is None and post["consistency_status"] == "unavailable"
    assert any("consistency unavailable" in note for note in post["notes"])


def test_score_is_zero_when_one_metric_is_zero(tmp_path: Path):
    run = tmp_path / "A" / "run_000"
    write_params(run)
    write_case(run, 0, [0], 1.0, post=cf_stage([(0.1, 2.0)], [(0.1, 2.0)], [(0.1, 2.0)]))
    (res,) = sm.summarize("A", results_dir=tmp_path)
    post = res["stages"]["post"]
    assert post["efficacy"]["mean"] == 100.0 and post["specificity"]["mean"] == 0.0
    assert post["score"] == 0.0
    assert post["efficacy"]["ci95"] is None  # one case: no interval


def test_zsre_run_aggregation(tmp_path: Path):
    run = tmp_path / "ECE_WI" / "run_000"
    write_params(run, ds_name="zsre")
    stages = [
        {"rewrite_prompts_correct": [[True, True]], "paraphrase_prompts_correct": [[True], [False, False]],
         "neighborhood_prompts_correct": [[True, False, False, False]]},
        {"rewrite_prompts_correct": [[True, False]], "paraphrase_prompts_correct": [[True, True]],
         "neighborhood_prompts_correct": [[True]]},
    ]
    write_case(run, 10, [10, 11], 1.5, post=stages[0])
    write_case(run, 11, [10, 11], 1.5, post=stages[1])
    (res,) = sm.summarize("ECE_WI", results_dir=tmp_path)
    assert res["dataset"] == "zsre"
    post = res["stages"]["post"]
    for key, per_case in (("efficacy", [1.0, 0.5]), ("generalization", [0.5, 1.0]),
                          ("specificity", [0.25, 1.0])):
        mean, half = ci(per_case)
        assert post[key]["mean"] == pytest.approx(mean)
        assert post[key]["ci95"] == pytest.approx(half)
    assert post["score"] == pytest.approx(3 / (1 / 75 + 1 / 75 + 1 / 62.5))
    assert post["efficacy_magnitude"] is None and post["fluency"] is None
    assert res["n_rounds"] == 1 and res["time_per_round"] == pytest.approx(1.5)
    assert res["time_total"] == pytest.approx(1.5)


def test_pre_post_final_kept_separate(tmp_path: Path):
    run = tmp_path / "ECE_WI" / "run_000"
    write_params(run, sequential=True, num_edits=1)
    fail = cf_stage([(3.0, 1.0)], [(3.0, 1.0)], [(1.0, 3.0)])  # 0 / 0 / 0
    win = cf_stage([(1.0, 3.0)], [(1.0, 3.0)], [(3.0, 1.0)])  # 100 / 100 / 100
    write_case(run, 0, [0], 1.0, num_edits=1, pre=fail, post=win, final=win)
    write_case(run, 1, [1], 3.0, num_edits=1, pre=fail, post=win, final=fail)
    (res,) = sm.summarize("ECE_WI", results_dir=tmp_path)
    assert list(res["stages"]) == ["pre", "post", "final"]
    pre, post, final = (res["stages"][s] for s in ("pre", "post", "final"))
    assert pre["efficacy"]["mean"] == 0.0 and pre["score"] == 0.0
    assert post["efficacy"]["mean"] == 100.0 and post["specificity"]["mean"] == 100.0
    assert post["score"] == pytest.approx(100.0)
    assert final["efficacy"]["mean"] == 50.0 and final["specificity"]["mean"] == 50.0
    assert final["score"] == pytest.approx(50.0)
    assert final["efficacy"]["ci95"] == pytest.approx(ci([1.0, 0.0])[1])
    assert res["n_rounds"] == 2 and res["time_total"] == pytest.approx(4.0)


def test_non_sequential_run_has_no_final(cf_results: Path):
    (run,) = sm.summarize("MEMIT", results_dir=cf_results)
    assert list(run["stages"]) == ["pre", "post"]
    assert run["stages"]["pre"]["efficacy"]["mean"] == 0.0
    assert run["stages"]["pre"]["specificity"]["mean"] == 100.0


# ------------------------------------------------------------------ run selection and files


def _three_runs(tmp_path: Path) -> Path:
    for i, eff in enumerate([(0.1, 2.0), (2.0, 0.1), (0.1, 2.0)]):
        run = tmp_path / "MEMIT" / f"run_00{i}"
        write_params(run)
        write_case(run, 0, [0], float(i + 1), post=cf_stage([eff], [eff], [(2.0, 0.1)]))
    return tmp_path


def test_runs_selection_and_ignored_entries(tmp_path: Path):
    root = _three_runs(tmp_path)
    (root / "MEMIT" / ".run_003").mkdir()
    (root / "MEMIT" / "notes").mkdir()
    # a temp file left by an interrupted atomic write, with a case-file-like name
    (root / "MEMIT" / "run_000" / ".2_edits-case_7.json").write_text("{not json")
    (root / "MEMIT" / "run_000" / ".2_edits-case_8.json.abc.tmp").write_text("{")
    assert [r["run"] for r in sm.summarize("MEMIT", results_dir=root)] == ["run_000", "run_001", "run_002"]
    picked = sm.summarize("MEMIT", runs="run_002,run_000", results_dir=root)
    assert [r["run"] for r in picked] == ["run_002", "run_000"]
    assert picked[1]["n_cases"] == 1
    assert [r["run"] for r in sm.summarize("MEMIT", runs=["1"], results_dir=root)] == ["run_001"]
    assert sm.summarize("MEMIT", runs=["run_001"], results_dir=root)[0]["stages"]["post"]["efficacy"]["mean"] == 0.0


def test_results_dir_from_environment(tmp_path: Path, monkeypatch):
    root = _three_runs(tmp_path)
    monkeypatch.setenv("ECE_RESULTS_DIR", str(root))
    assert len(sm.summarize("MEMIT")) == 3


def test_missing_run_message_names_path_and_available(tmp_path: Path):
    root = _three_runs(tmp_path)
    with pytest.raises(sm.SummarizeError) as info:
        sm.summarize("MEMIT", runs="run_000,run_009", results_dir=root)
    msg = str(info.value)
    assert "run_009" in msg and str(root / "MEMIT") in msg
    assert "run_000, run_001, run_002" in msg


def test_missing_results_folder_message(tmp_path: Path):
    _three_runs(tmp_path)
    with pytest.raises(sm.SummarizeError) as info:
        sm.summarize("ROME", results_dir=tmp_path)
    assert str(tmp_path / "ROME") in str(info.value) and "MEMIT" in str(info.value)
    with pytest.raises(sm.SummarizeError) as info:
        sm.summarize("MEMIT", results_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "MEMIT") in str(info.value)


def test_corrupt_case_file_named(tmp_path: Path):
    root = _three_runs(tmp_path)
    bad = root / "MEMIT" / "run_001" / "2_edits-case_5.json"
    bad.write_text('{"case_id": 5, "post": {"rewrite_prompts_pr')
    with pytest.raises(sm.SummarizeError) as info:
        sm.summarize("MEMIT", runs="run_001", results_dir=root)
    assert str(bad) in str(info.value)
    # structurally broken: an NLL entry without target_true
    bad.write_text(json.dumps({"case_id": 5, "post": {"rewrite_prompts_probs": [{"target_new": 1.0}]}}))
    with pytest.raises(sm.SummarizeError) as info:
        sm.summarize("MEMIT", runs="run_001", results_dir=root)
    assert str(bad) in str(info.value) and "target_true" in str(info.value)


def test_cli_errors_without_traceback(tmp_path: Path, capsys):
    root = _three_runs(tmp_path)
    bad = root / "MEMIT" / "run_002" / "2_edits-case_4.json"
    bad.write_text("[1, 2")
    assert sm.main(["--dir_name=MEMIT", f"--results_dir={root}"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert sm.main(["--dir_name=MEMIT", "--runs=run_007", f"--results_dir={root}"]) == 2
    err = capsys.readouterr().err
    assert "run_007" in err and "run_000, run_001, run_002" in err


# ------------------------------------------------------------------ CLI output


def test_cli_table(cf_results: Path, capsys):
    assert sm.main(["--dir_name=MEMIT", "--runs=run_000", f"--results_dir={cf_results}"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("run_000  ")]
    assert len(rows) == 2
    pre_row, post_row = rows
    assert " pre " in pre_row and " post " in post_row
    mean, half = ci(EFF)
    assert f"{mean:.1f} ± {half:.1f}" in post_row  # 66.7 ± 65.3
    assert "50.0 ± 56.6" in post_row  # generalization and specificity
    assert f"{3 / (3 / 200 + 1 / 50 + 1 / 50):.1f}" in post_row  # Score 54.5
    assert "600.0 ± 22.6" in post_row  # fluency x100
    assert "n/a" in post_row  # consistency unavailable
    assert post_row.endswith("3.50")  # s/round
    assert "consistency unavailable" in out
    assert "3 cases in 2 rounds" in out and "3.50 s/round, 7.00 s total" in out


def test_cli_json(cf_results: Path, capsys):
    assert sm.main(["--dir_name=MEMIT", f"--results_dir={cf_results}", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 1 and data[0]["run"] == "run_000"
    post = data[0]["stages"]["post"]
    assert post["specificity"]["mean"] == pytest.approx(50.0)
    assert post["specificity_magnitude"]["mean"] == pytest.approx(ci(SPEC_MAG)[0])
    assert post["consistency"] is None
    assert data[0]["time_total"] == pytest.approx(7.0) and data[0]["n_rounds"] == 2
    assert data[0]["model_name"] == "gpt2-xl" and data[0]["sequential"] is False


def test_cli_as_script_json(cf_results: Path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "summarize.py"), "--dir_name=MEMIT", "--runs=run_000",
         f"--results_dir={cf_results}", "--json"],
        capture_output=True, text=True, cwd=str(cf_results), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data[0]["stages"]["post"]["efficacy"]["mean"] == pytest.approx(200 / 3)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "summarize.py"), "--dir_name=NOPE", f"--results_dir={cf_results}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(cf_results / "NOPE") in proc.stderr


# ------------------------------------------------------------------ downstream


def _write_glue(run_dir: Path) -> None:
    folder = run_dir / "glue_eval"
    folder.mkdir()
    (folder / "after_2.json").write_text(json.dumps({
        "edit_count": 2, "tasks": {"sst2": {"accuracy": 0.8}, "mrpc": {"accuracy": 0.6, "f1": 0.55}}}))
    (folder / "before.json").write_text(json.dumps({
        "edit_count": 0, "tasks": {"sst2": {"accuracy": 0.9}, "mrpc": {"accuracy": 0.7, "f1": 0.75},
                                   "cola": {"accuracy": 0.5, "mcc": 0.125}}}))
    (folder / ".after_4.json.tmp").write_text("{")


def test_downstream_table_and_plot(cf_results: Path, capsys):
    run_dir = cf_results / "MEMIT" / "run_000"
    _write_glue(run_dir)
    (run,) = sm.summarize("MEMIT", results_dir=cf_results)
    rows = run["downstream"]
    assert [r["edit_count"] for r in rows] == [0, 2]
    assert rows[0]["tasks"]["cola"]["mcc"] == 0.125
    assert rows[1]["tasks"]["mrpc"]["f1"] == 0.55

    assert sm.main(["--dir_name=MEMIT", f"--results_dir={cf_results}", "--plot"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("edit_count"))
    assert "sst2 accuracy" in header and "mrpc f1" in header and "cola mcc" in header
    cols = header.split("  ")
    cols = [c.strip() for c in cols if c.strip()]
    row0 = next(line for line in lines[lines.index(header):] if line.split() and line.split()[0] == "0").split()
    row2 = next(line for line in lines[lines.index(header):] if line.split() and line.split()[0] == "2").split()
    values0, values2 = dict(zip(cols, row0)), dict(zip(cols, row2))
    assert values0["sst2 accuracy"] == "0.900" and values2["sst2 accuracy"] == "0.800"
    assert values0["mrpc f1"] == "0.750" and values2["mrpc f1"] == "0.550"
    assert values0["cola mcc"] == "0.125" and values2["cola mcc"] == "-"
    png = run_dir / "downstream.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Plot: {png}" in out


def test_plot_path_in_json_and_no_glue_is_quiet(cf_results: Path, tmp_path: Path, capsys):
    root = _three_runs(tmp_path / "other")
    assert sm.main(["--dir_name=MEMIT", f"--results_dir={root}", "--plot", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert all(r["downstream"] is None and r["downstream_plot"] is None for r in data)
    assert not list((root / "MEMIT").rglob("*.png"))
    assert captured.err == ""

    _write_glue(cf_results / "MEMIT" / "run_000")
    assert sm.main(["--dir_name=MEMIT", f"--results_dir={cf_results}", "--plot", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["downstream_plot"] == str(cf_results / "MEMIT" / "run_000" / "downstream.png")
    assert Path(data[0]["downstream_plot"]).stat().st_size > 0


def test_corrupt_downstream_file_named(cf_results: Path):
    folder = cf_results / "MEMIT" / "run_000" / "glue_eval"
    folder.mkdir()
    bad = folder / "0.json"
    bad.write_text(json.dumps({"tasks": {"sst2": {"accuracy": 0.9}}}))
    with pytest.raises(sm.SummarizeError) as info:
        sm.summarize("MEMIT", results_dir=cf_results)
    assert str(bad) in str(info.value) and "edit_count" in str(info.value)


# ------------------------------------------------------------------ generation protocol and consistency source

SUBSTITUTE = "tf-idf substitute: WikiText+CounterFact"
PUBLISHED_PROTOCOL = {"name": "published", "decoding": "top-k sampling", "top_k": 5, "max_out_len": 100,
                      "length_includes_prompt": True, "seed": 0}
GREEDY_PROTOCOL = {"name": "greedy", "decoding": "greedy (argmax)", "max_new_tokens": 50}


def gen_stage(protocol: dict, fluency: float, consistency: float | None, source: str | None = SUBSTITUTE) -> dict:
    extra = {"consistency_source": source} if source else {}
    return cf_stage([(0.1, 2.0)], [(0.1, 2.0)], [(2.0, 0.1)], ngram_entropy=fluency, reference_score=consistency,
                    generation_protocol=protocol, text=["t"], **extra)


def _consistency_header(table: str) -> str:
    header = next(line for line in table.splitlines() if line.startswith("Run "))
    assert "Consistency" in header
    return header[header.index("Consistency"):]


def test_protocol_and_consistency_source_are_named(tmp_path: Path, capsys):
    run = tmp_path / "MEMIT" / "run_000"
    write_params(run)
    params = json.loads((run / "params.json").read_text())
    (run / "params.json").write_text(json.dumps({**params, "generation_protocol": "greedy"}))
    write_case(run, 0, [0], 1.0, post=gen_stage(PUBLISHED_PROTOCOL, 6.0, 0.2))
    write_case(run, 1, [1], 1.0, post=gen_stage({**PUBLISHED_PROTOCOL, "seed": 1}, 5.0, 0.4))
    (res,) = sm.summarize("MEMIT", results_dir=tmp_path)
    post = res["stages"]["post"]
    assert post["fluency"]["mean"] == pytest.approx(550.0)  # another seed is the same protocol
    assert post["consistency"]["mean"] == pytest.approx(30.0)
    assert post["generation_protocol"]["name"] == "published" and post["generation_protocol"]["seed"] == [0, 1]
    assert post["consistency_source"] == SUBSTITUTE and res["generation_protocol"] == "greedy"
    assert any("asks for the greedy generation protocol" in note for note in post["notes"])

    assert sm.main(["--dir_name=MEMIT", f"--results_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert _consistency_header(out).startswith(f"Consistency ({SUBSTITUTE})")
    post_row = next(line for line in out.splitlines() if line.startswith("run_000  post"))
    assert " published " in post_row and "550.0 ± 98.0" in post_row and "30.0 ± 19.6" in post_row
    assert "published: top-k 5 sampling, 100 tokens including the prompt, seed 0, 1" in out
    assert f"consistency source: {SUBSTITUTE}" in out and "WARNING" not in out


def test_mixed_protocols_in_one_run_are_not_averaged(tmp_path: Path, caplog):
    run = tmp_path / "MEMIT" / "run_000"
    write_params(run)
    write_case(run, 0, [0], 1.0, post=gen_stage(PUBLISHED_PROTOCOL, 6.0, 0.2))
    write_case(run, 1, [1], 1.0, post=gen_stage(GREEDY_PROTOCOL, 2.0, 0.4))
    write_case(run, 2, [2], 1.0, post=gen_stage(PUBLISHED_PROTOCOL, 5.0, 0.1))
    with caplog.at_level("WARNING", logger="experiments.metrics"):
        (res,) = sm.summarize("MEMIT", results_dir=tmp_path)
    post = res["stages"]["post"]
    assert post["fluency"] is None and post["consistency"] is None
    assert post["fluency_status"] == post["consistency_status"] == "mixed"
    assert post["efficacy"]["mean"] == 100.0  # the other metrics are still aggregated
    assert post["generation_protocol"]["name"] == "mixed"
    assert any("2 cases published" in note and "1 cases greedy" in note for note in post["notes"])
    assert "mix generation protocols" in caplog.text
    post_row = next(line for line in sm.render_text([res]).splitlines() if line.startswith("run_000  post"))
    assert post_row.count("mixed") == 3  # the Generation, Fluency and Consistency cells


def test_runs_with_different_protocols_are_flagged(tmp_path: Path, caplog):
    for name, protocol in (("run_000", PUBLISHED_PROTOCOL), ("run_001", GREEDY_PROTOCOL)):
        write_params(tmp_path / "MEMIT" / name)
        write_case(tmp_path / "MEMIT" / name, 0, [0], 1.0, post=gen_stage(protocol, 6.0, 0.2))
    runs = sm.summarize("MEMIT", results_dir=tmp_path)
    with caplog.at_level("WARNING", logger="summarize"):
        text = sm.render_text(runs)
    assert "WARNING: these rows were generated with different protocols (published, greedy)" in text
    assert "different protocols" in caplog.text
    assert "greedy: argmax decoding, 50 new tokens" in text
    assert [runs[0]["stages"]["post"]["fluency"]["mean"], runs[1]["stages"]["post"]["fluency"]["mean"]] == [600, 600]


def test_mixed_consistency_sources_are_not_averaged(tmp_path: Path):
    run = tmp_path / "MEMIT" / "run_000"
    write_params(run)
    write_case(run, 0, [0], 1.0, post=gen_stage(PUBLISHED_PROTOCOL, 6.0, 0.2))
    write_case(run, 1, [1], 1.0, post=gen_stage(PUBLISHED_PROTOCOL, 5.0, 0.4, source="published: ROME"))
    write_case(run, 2, [2], 1.0, post=gen_stage(PUBLISHED_PROTOCOL, 4.0, None, source=None))
    (res,) = sm.summarize("MEMIT", results_dir=tmp_path)
    post = res["stages"]["post"]
    assert post["consistency"] is None and post["consistency_status"] == "mixed"
    assert post["consistency_source"] == "mixed"
    assert post["fluency"]["mean"] == pytest.approx(500.0)
    assert _consistency_header(sm.render_text([res])).startswith("Consistency (sources differ")


def test_consistency_header_is_never_bare(cf_results: Path):
    (res,) = sm.summarize("MEMIT", results_dir=cf_results)
    text = sm.render_text([res])
    assert _consistency_header(text).startswith("Consistency (unavailable)")
    assert res["stages"]["post"]["generation_protocol"] == {"name": "not recorded"}  # files written before
    assert "not recorded: the case files do not say how their texts were generated" in text


def test_metrics_live_in_one_module_shared_with_the_benchmark():
    from experiments import benchmark, metrics

    for name in ("counterfact_case_metrics", "zsre_case_metrics", "summarize_stage", "detect_dataset"):
        assert getattr(sm, name) is getattr(metrics, name)
    assert benchmark.summarize_stage is metrics.summarize_stage
    assert benchmark.counterfact_case_metrics is metrics.counterfact_case_metrics
    stage = metrics.summarize_stage([{"efficacy": 1.0, "generalization": 0.5, "specificity": 1.0}], metrics.ZSRE,
                                    "post")
    assert stage["score"] == pytest.approx(metrics.harmonic_mean([100.0, 50.0, 100.0]))


def test_cli_verbose_prints_the_traceback(tmp_path: Path, capsys):
    assert sm.main(["--dir_name=MEMIT", f"--results_dir={tmp_path}", "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "SummarizeError" in err


# ------------------------------------------------------------------ free generation

FREE = {"extra_tokens": 10, "decoding": "greedy (argmax)"}


def free_keys(rewrite, paraphrase, neighborhood, protocol=FREE) -> dict:
    return {"rewrite_prompts_generated_correct": rewrite, "paraphrase_prompts_generated_correct": paraphrase,
            "neighborhood_prompts_generated_correct": neighborhood, "free_generation": protocol,
            "rewrite_prompts_generated_text": [" x"] * len(rewrite)}


def _cells(text: str, stage: str) -> dict:
    """``{header: cell}`` of the table row of run_000 at ``stage`` (columns are 2+ spaces apart)."""
    import re

    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Run "))
    names = re.split(r"\s{2,}", lines[header].strip())
    row = next(line for line in lines if re.match(rf"run_000\s+{stage}\s", line))
    return dict(zip(names, re.split(r"\s{2,}", row.strip())))


def test_free_generation_columns_beside_the_teacher_forced_ones(tmp_path: Path, capsys):
    """pre, post and final each get their own free columns; case 0's rewrite prompt is top-1 under teacher
    forcing but its free answer fails, so the two rates differ."""
    run = tmp_path / "MEMIT" / "run_000"
    write_params(run, sequential=True)
    win = cf_stage([(1.0, 3.0)], [(1.0, 3.0), (1.0, 3.0)], [(3.0, 1.0)],
                   rewrite_prompts_correct=[True], paraphrase_prompts_correct=[True, False],
                   neighborhood_prompts_correct=[True])
    pre = cf_stage([(3.0, 1.0)], [(3.0, 1.0)], [(3.0, 1.0)], **free_keys([False], [False], [True]))
    write_case(run, 0, [0, 1], 2.0, pre=pre, post={**win, **free_keys([False], [True, False], [True])},
               final={**win, **free_keys([False], [False, False], [False])})
    write_case(run, 1, [0, 1], 2.0, pre=pre, post={**win, **free_keys([True], [True, True], [True])},
               final={**win, **free_keys([True], [False, True], [True])})
    (res,) = sm.summarize("MEMIT", results_dir=tmp_path)
    post, final = res["stages"]["post"], res["stages"]["final"]
    assert post["efficacy_free"]["mean"] == pytest.approx(50.0)
    assert post["efficacy_free"]["ci95"] == pytest.approx(ci([0.0, 1.0])[1])
    assert post["generalization_free"]["mean"] == pytest.approx(75.0)
    assert final["specificity_free"]["mean"] == pytest.approx(50.0)
    assert res["stages"]["pre"]["efficacy_free"]["mean"] == 0.0
    assert post["efficacy_top1"]["mean"] == 100.0 and post["generalization_top1"]["mean"] == 50.0
    assert post["free_generation"] == FREE and post["notes"] == []
    assert sm.main(["--dir_name=MEMIT", f"--results_dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    cells = {stage: _cells(text, stage) for stage in ("pre", "post", "final")}
    assert cells["post"]["Efficacy"] == f"100.0 {sm._pm()} 0.0"
    assert cells["post"]["Eff. free"] == f"50.0 {sm._pm()} {ci([0, 1])[1]:.1f}"
    assert cells["post"]["Gen. free"].startswith("75.0") and cells["final"]["Spec. free"].startswith("50.0")
    assert cells["pre"]["Spec. free"] == f"100.0 {sm._pm()} 0.0" and cells["final"]["Gen. free"].startswith("25.0")
    assert "Free (Eff./Gen./Spec. free)" in text
    data = json.loads(sm.to_json([res]))
    assert data[0]["stages"]["final"]["generalization_free"]["mean"] == pytest.approx(25.0)


def test_runs_without_free_generation_show_a_dash(cf_results: Path, capsys):
    assert sm.main(["--dir_name=MEMIT", f"--results_dir={cf_results}"]) == 0
    cells = _cells(capsys.readouterr().out, "post")
    assert (cells["Eff. free"], cells["Gen. free"], cells["Spec. free"]) == ("-", "-", "-")
    assert cells["Efficacy"].startswith("66.7")  # the teacher-forced columns are unchanged
    (res,) = sm.summarize("MEMIT", results_dir=cf_results)
    assert res["stages"]["post"]["efficacy_free"] is None and res["stages"]["post"]["free_generation"] is None
    assert not any("free-generation" in n for n in res["stages"]["post"]["notes"])


def test_free_generation_in_some_cases_only_is_noted_and_mixed_settings_not_averaged(tmp_path: Path):
    run = tmp_path / "MEMIT" / "run_000"
    write_params(run)
    write_case(run, 0, [0], 1.0, post=cf_stage([(1.0, 3.0)], [], [(3.0, 1.0)], **free_keys([True], [], [True])))
    write_case(run, 1, [1], 1.0, post=cf_stage([(1.0, 3.0)], [], [(3.0, 1.0)]))
    (res,) = sm.summarize("MEMIT", results_dir=tmp_path)
    post = res["stages"]["post"]
    assert post["efficacy_free"]["mean"] == 100.0 and post["efficacy_free"]["n"] == 1
    assert post["generalization_free"] is None  # no paraphrase prompts
    assert "free-generation metrics from 1 of 2 cases" in " ".join(post["notes"])
    write_case(run, 1, [1], 1.0, post=cf_stage([(1.0, 3.0)], [], [(3.0, 1.0)],
                                               **free_keys([False], [], [True], {**FREE, "extra_tokens": 5})))
    (res,) = sm.summarize("MEMIT", results_dir=tmp_path)
    post = res["stages"]["post"]
    assert post["efficacy_free"] is None and post["free_generation"] == "mixed"
    assert any("decoded with different settings" in n for n in post["notes"])


def test_zsre_free_generation_and_bad_values(tmp_path: Path):
    stage = {"rewrite_prompts_correct": [[True, False]], "paraphrase_prompts_correct": [[True]],
             "neighborhood_prompts_correct": [[True]], **free_keys([False], [True], [False, True])}
    m = sm.zsre_case_metrics(stage)
    assert (m["efficacy"], m["efficacy_free"], m["specificity_free"]) == (0.5, 0.0, 0.5)
    with pytest.raises(ValueError, match="rewrite_prompts_generated_correct"):
        sm.zsre_case_metrics({**stage, "rewrite_prompts_generated_correct": [1]})
    run = tmp_path / "ECE_WI" / "run_000"
    write_params(run, ds_name="zsre")
    write_case(run, 0, [0], 1.0, post=stage)
    (res,) = sm.summarize("ECE_WI", results_dir=tmp_path)
    assert res["stages"]["post"]["generalization_free"]["mean"] == 100.0
    assert "efficacy_top1" not in res["stages"]["post"]  # zsRE's teacher-forced metric is token accuracy


def test_benchmark_rows_carry_the_free_generation_rates():
    from experiments import benchmark

    stage = cf_stage([(1.0, 3.0)], [(1.0, 3.0)], [(3.0, 1.0)], rewrite_prompts_correct=[True],
                     paraphrase_prompts_correct=[False], neighborhood_prompts_correct=[True],
                     **free_keys([False], [False], [True]))
    quality = benchmark.edit_quality([sm.counterfact_case_metrics(stage)] * 2)
    assert set(benchmark.QUALITY_METRICS) == set(quality) and len(quality) == 9
    assert (quality["efficacy"], quality["efficacy_top1"], quality["efficacy_free"]) == (100.0, 100.0, 0.0)
    assert (quality["generalization_top1"], quality["specificity_free"]) == (0.0, 100.0)
    old = benchmark.edit_quality([sm.counterfact_case_metrics(cf_stage([(1.0, 3.0)], [], [(3.0, 1.0)]))])
    assert old["efficacy"] == 100.0 and old["efficacy_free"] is None
    # *_correct filled otherwise by older files: no top-1 rate, no error
    assert sm.counterfact_case_metrics({**stage, "rewrite_prompts_correct": [[True, False]]})["efficacy_top1"] is None


# ------------------------------------------------------------------ ECE explanations (--explain)


def explanation_request(case_id: int, cluster: int, layer3: list, layer4: list) -> dict:
    return {"case_id": case_id, "subject": f"S{case_id}", "prompt": "{} plays", "target_new": "x", "cluster": cluster,
            "loop": cluster, "n_own_neurons_first_layer": 10, "top_neurons": {"3": layer3, "4": layer4},
            "target_steps": 5, "target_loss": 0.1, "remaining_error": 1.0}


def write_explanation(run_dir: Path, round_index: int = 0) -> Path:
    """Two clusters over two layers; the expected aggregation is worked out in the test below."""
    explanation = {
        "round": round_index, "method": "ECE_AS", "neuron_threshold": 0.8, "z_mode": "per_request",
        "cluster_by": "neurons", "scored_after_update": True, "n_requests": 5, "n_clusters": 2, "n_loops": 2,
        "seconds": {"explain": 0.1},
        "layers": {"3": {"n_neurons": 64, "n_selected": 16, "selected_neurons": list(range(16)), "mass_share": 0.8,
                         "top_neurons": []},
                   "4": {"n_neurons": 64, "n_selected": 8, "selected_neurons": list(range(8)), "mass_share": 0.75,
                         "top_neurons": []}},
        "clusters": [{"cluster": 0, "size": 3, "case_ids": [10, 12, 13], "mean_jaccard": 0.4, "loops": 1,
                      "relations": {"P17": 2, "P36": 1}},
                     {"cluster": 1, "size": 2, "case_ids": [11, 14], "mean_jaccard": 2 / 3, "loops": 1}],
        "requests": [explanation_request(10, 0, [5, 7, 9], [1, 2]), explanation_request(11, 1, [20, 21, 5], [8, 9]),
                     explanation_request(12, 0, [7, 5, 11], [2, 3]), explanation_request(13, 0, [5, 12, 7], [2, 1]),
                     explanation_request(14, 1, [21, 22, 23], [9, 8])],
        "refinement": [],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"explanation_round_{round_index:03d}.json"
    path.write_text(json.dumps(explanation))
    return path


def test_explain_prints_clusters_and_the_top_neurons_their_members_share(tmp_path: Path, capsys):
    run_dir = tmp_path / "ECE_AS" / "run_000"
    path = write_explanation(run_dir)
    (run_dir / "explanation_round_001.json.tmp").write_text("{")  # an unfinished write is not a round
    assert sm.main(["--dir_name=ECE_AS", "--runs=run_000", f"--results_dir={tmp_path}", "--explain"]) == 0
    out = capsys.readouterr().out
    lines = [line.split(None, 2) for line in out.splitlines()]
    assert f"run_000 round 0 ({path}): ECE_AS, 5 requests, 2 clusters by neurons, 2 loops" in out
    # per layer: selected, neurons, selected / neurons, mass share
    words = [line.split() for line in out.splitlines()]
    assert ["3", "16", "64", "0.250", "0.800"] in words and ["4", "8", "64", "0.125", "0.750"] in words
    cluster_rows = [line for line in out.splitlines() if line.startswith(("0    ", "1    ")) and "(" not in line]
    assert cluster_rows[0].split() == ["0", "3", "0.400", "1", "P17:2,", "P36:1"]
    assert cluster_rows[1].split() == ["1", "2", "0.667", "1", "-"]
    # Counts of members listing each neuron; ties go to the better summed rank, then the lower index.
    assert ["0", "3", "5 (3), 7 (3), 12 (1), 9 (1), 11 (1)"] in lines
    assert ["1", "3", "21 (2), 20 (1), 22 (1), 5 (1), 23 (1)"] in lines
    assert ["0", "4", "2 (3), 1 (2), 3 (1)"] in lines
    assert ["1", "4", "8 (2), 9 (2)"] in lines
    assert "Plot:" not in out and not list(run_dir.glob("*.png"))


def test_explain_plot_writes_one_png_per_round_and_json_carries_the_counts(tmp_path: Path, capsys):
    run_dir = tmp_path / "ECE_AS" / "run_000"
    write_explanation(run_dir, 0)
    write_explanation(run_dir, 1)
    assert sm.main(["--dir_name=ECE_AS", f"--results_dir={tmp_path}", "--explain", "--plot"]) == 0
    out = capsys.readouterr().out
    for round_index in (0, 1):
        png = run_dir / f"explanation_round_{round_index:03d}.png"
        assert f"Plot: {png}" in out
        assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heat = sm.explanation_heatmap(json.loads((run_dir / "explanation_round_000.json").read_text()))
    assert heat["case_ids"] == [10, 12, 13, 11, 14] and heat["sizes"] == [3, 2] and heat["layer"] == "3"
    assert heat["neurons"] == [5, 7, 9, 11, 12, 21, 20, 22, 23] and heat["listed"] == 9  # cluster 0's block first
    assert heat["cells"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # case 10 lists 5, 7, 9
    assert heat["cells"][3].tolist() == [1, 0, 0, 0, 0, 1, 1, 0, 0]  # case 11 lists 20, 21, 5
    assert sm.main(["--dir_name=ECE_AS", f"--results_dir={tmp_path}", "--explain", "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in run["rounds"]] == [0, 1] and run["rounds"][0]["plot"] is None
    first = run["rounds"][0]
    assert first["clusters"][0]["top_neurons"]["3"][:2] == [[5, 3], [7, 3]]
    assert first["clusters"][0]["relations"] == {"P17": 2, "P36": 1} and first["clusters"][1]["relations"] is None
    assert first["layers"][1] == {"layer": "4", "n_selected": 8, "n_neurons": 64, "mass_share": 0.75}


def test_explain_errors_name_the_file(tmp_path: Path, capsys):
    run_dir = tmp_path / "ECE_AS" / "run_000"
    write_params(run_dir)
    assert sm.main(["--dir_name=ECE_AS", f"--results_dir={tmp_path}", "--explain"]) == 2
    assert f"no explanation_round_NNN.json in {run_dir}" in capsys.readouterr().err
    path = write_explanation(run_dir)
    data = json.loads(path.read_text())
    data["requests"][1]["cluster"] = 7
    path.write_text(json.dumps(data))
    assert sm.main(["--dir_name=ECE_AS", f"--results_dir={tmp_path}", "--explain"]) == 2
    err = capsys.readouterr().err
    assert f"corrupt explanation file {path}: request 1 names no cluster" in err and "Traceback" not in err
    data["requests"][1]["cluster"] = 1
    for change, message in [(lambda d: d["requests"][2]["top_neurons"].update({"4": ["a"]}),
                             "request 2: 'top_neurons'"),
                            (lambda d: d["layers"]["4"].pop("n_neurons"), "layer 4 needs whole numbers")]:
        broken = json.loads(json.dumps(data))
        change(broken)
        path.write_text(json.dumps(broken))
        assert sm.main(["--dir_name=ECE_AS", f"--results_dir={tmp_path}", "--explain"]) == 2
        assert f"corrupt explanation file {path}: {message}" in capsys.readouterr().err


# ------------------------------------------------------------------ curves over the number of edits


def _sequential_run(root: Path, alg: str, forgets: bool) -> Path:
    """Two rounds of one edit: case 0 is lost by the end when ``forgets``; curve points at 0, 1 and 2 edits
    (the one after the last round leaves the edits so far to the final stage), downstream checks at 0 and 2."""
    from experiments.curves import write_curve_point

    run_dir = root / alg / "run_000"
    write_params(run_dir, sequential=True, num_edits=1)
    params = json.loads((run_dir / "params.json").read_text())
    (run_dir / "params.json").write_text(json.dumps({**params, "alg_name": alg}))
    good = cf_stage([(1.0, 3.0)], [(1.0, 3.0)], [(3.0, 1.0)])
    lost = cf_stage([(3.0, 1.0)], [(3.0, 1.0)], [(3.0, 1.0)])
    write_case(run_dir, 0, [0], 1.0, num_edits=1, post=good, final=lost if forgets else good)
    write_case(run_dir, 1, [1], 1.0, num_edits=1, post=good, final=good)
    layer = "model.layers.3.mlp.down_proj"
    for count, so_far, ppl in ((0, None, 20.0), (1, {"n_cases": 1, "efficacy": {"mean": 100.0}}, 21.0),
                               (2, None, 30.0 if forgets else 21.5)):
        norm = 0.0 if count == 0 else float(count)
        write_curve_point(run_dir, count, count, {
            "edits_so_far": so_far, "perplexity_unedited": 20.0, "perplexity_edited": ppl,
            "edit_norm": {layer: norm}, "edit_spectral_norm": {layer: norm / 2},
            "edit_spectral_ratio": {layer: norm / 10}, "relative_output_change": {layer: norm / 100}})
    folder = run_dir / "glue_eval"
    folder.mkdir()
    for count, accuracy in ((0, 0.8), (2, 0.5 if forgets else 0.75)):
        (folder / f"edits_{count:06d}.json").write_text(json.dumps(
            {"edit_count": count, "tasks": {"sst2": {"accuracy": accuracy}, "rte": {"accuracy": accuracy - 0.2}}}))
    return run_dir


def test_run_series_takes_the_last_point_from_the_final_stage(tmp_path: Path):
    from experiments.curves import load_curve, run_series

    run_dir = _sequential_run(tmp_path, "MEMIT", forgets=True)
    (run,) = sm.summarize("MEMIT", results_dir=tmp_path)
    series = run_series(load_curve(run_dir), run)
    assert series["quality"]["efficacy"] == [(1, 100.0), (2, 50.0)]  # case 0 forgotten in the final state
    assert series["quality"]["specificity"] == [(2, 100.0)]
    assert series["perplexity"] == [(0, 20.0), (1, 21.0), (2, 30.0)]
    assert series["edit_norm"] == {"layer 3": [(0, 0.0), (1, 1.0), (2, 2.0)]}
    assert series["downstream"] == {"sst2": [(0, 80.0), (2, 50.0)], "rte": [(0, pytest.approx(60.0)),
                                                                            (2, pytest.approx(30.0))]}
    from experiments.curves import curve_rows

    rows = curve_rows(series)
    assert [r["edit_count"] for r in rows] == [0, 1, 2] and run["curve"] == rows
    assert rows[0]["efficacy"] is None and rows[0]["downstream_accuracy"] == pytest.approx(70.0)
    assert (rows[2]["efficacy"], rows[2]["perplexity"], rows[2]["max_spectral_ratio"]) == (50.0, 30.0, 0.2)
    assert rows[1]["downstream_accuracy"] is None


def test_compare_table_and_curve_pictures(tmp_path: Path, capsys):
    _sequential_run(tmp_path, "MEMIT", forgets=True)
    _sequential_run(tmp_path, "AlphaEdit", forgets=False)
    assert sm.main(["--compare", "MEMIT/run_000", "AlphaEdit/run_000", f"--results_dir={tmp_path}", "--plot"]) == 0
    out = capsys.readouterr().out
    rows = {(line.split()[0], line.split()[3]): line.split() for line in out.splitlines()
            if line.split()[:1] in (["MEMIT"], ["AlphaEdit"])}
    # Method, Run, Edits, Stage, Efficacy, Generalization, Specificity, ..., Perplexity, Downstream acc. @edits
    memit_final = rows[("MEMIT", "final")]
    assert memit_final[4] == "50.0" and memit_final[5] in ("±", "+-") and memit_final[6] == "98.0"
    assert rows[("AlphaEdit", "final")][4] == "100.0"
    assert rows[("MEMIT", "final")][-3:] == ["30.00", "40.0", "@2"]
    assert rows[("AlphaEdit", "final")][-3:] == ["21.50", "65.0", "@2"]
    assert "unedited model: 20.00" in out
    for png in (tmp_path / "compare_curves.png", tmp_path / "MEMIT" / "run_000" / "curves.png",
                tmp_path / "AlphaEdit" / "run_000" / "curves.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"Plot: {png}" in out


def test_compare_notes_fluency_over_fewer_cases_and_substitute_prompts(tmp_path: Path, capsys):
    run_dir = _sequential_run(tmp_path, "AlphaEdit", forgets=False)
    path = run_dir / "1_edits-case_0.json"
    case = json.loads(path.read_text())
    case["final"].update(ngram_entropy=6.0, reference_score=0.25, text=["t"], generation_protocol=PUBLISHED_PROTOCOL,
                         consistency_source="refs S", generation_prompts_source="substitute prompts P")
    case["pre"] = cf_stage([(3.0, 1.0)], [(3.0, 1.0)], [(3.0, 1.0)], ngram_entropy=6.5, text=["u"],
                           generation_protocol=PUBLISHED_PROTOCOL)
    path.write_text(json.dumps(case))
    assert sm.main(["--compare", "AlphaEdit/run_000", f"--results_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    final = next(line.split() for line in out.splitlines() if line.split()[:1] == ["AlphaEdit"]
                 and line.split()[3] == "final")
    assert final[13:15] == ["600.0", "25.0"]  # Fluency, Consistency (x100) of the one case that has them
    assert "Consistency*" in out and "* Consistency (refs S)." in out
    assert "fluency of the unedited model: 650.0" in out
    assert "(every --generation_test_interval-th case id): AlphaEdit final 1." in out
    assert "Fluency and consistency texts from substitute prompts P." in out


def test_compare_names_the_runs_that_share_an_unedited_fluency(tmp_path: Path, capsys):
    for alg, entropy in (("AlphaEdit", 6.5), ("MEMIT", 6.5), ("ECE_WI", 6.0)):
        path = _sequential_run(tmp_path, alg, forgets=False) / "1_edits-case_0.json"
        case = json.loads(path.read_text())
        case["pre"] = cf_stage([(3.0, 1.0)], [(3.0, 1.0)], [(3.0, 1.0)], ngram_entropy=entropy, text=["u"],
                               generation_protocol=PUBLISHED_PROTOCOL)
        path.write_text(json.dumps(case))
    assert sm.main(["--compare", "AlphaEdit/run_000", "MEMIT/run_000", "ECE_WI/run_000",
                    f"--results_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "; fluency of the unedited model (pre stage of AlphaEdit, MEMIT): 650.0;" in out
    assert "; fluency of the unedited model (pre stage of ECE_WI): 600.0;" in out


@pytest.mark.parametrize("argv, message", [
    (["--compare", "MEMIT"], "ALG/run_NNN"),
    ([], "either --dir_name"),
    (["--dir_name=MEMIT", "--compare", "MEMIT/run_000"], "either --dir_name"),
])
def test_compare_arguments_checked(tmp_path: Path, capsys, argv, message):
    _sequential_run(tmp_path, "MEMIT", forgets=False)
    assert sm.main([*argv, f"--results_dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err


def test_curve_point_without_held_out_text_keeps_the_edit_norms(tiny_llama, tiny_tok, data_dir, caplog):
    """Statistics from another corpus skip no WikiText; when the text is too short for the chunks after the
    statistics' ones, the point says why and still measures the accumulated edit."""
    import types

    import torch

    from experiments.curves import GenericText, curve_point, statistics_chunks
    from experiments.driver import Evaluator, load_records
    from util.weights import add_to_weight, load_weights, snapshot_weights

    assert statistics_chunks(types.SimpleNamespace(mom2_dataset="wikipedia", mom2_n_samples=10, mom2_sample_length=1024)) == 0
    assert statistics_chunks(types.SimpleNamespace(mom2_dataset="wikitext", mom2_n_samples=10, mom2_sample_length=200)) == 16
    name = "model.layers.1.mlp.down_proj"
    original = snapshot_weights(tiny_llama, [name])
    add_to_weight(tiny_llama, name, torch.ones_like(original[name]) * 0.01)
    try:
        evaluator = Evaluator("mcf", data_dir, skip_generation=True, interval=1, batch_size=8, free_generation=False)
        point = curve_point(tiny_llama, tiny_tok, evaluator, load_records("mcf", data_dir, 2), original,
                            GenericText(tiny_tok, statistics_chunks=10**7, data_dir=data_dir))
    finally:
        load_weights(tiny_llama, original)
    assert point["edits_so_far"]["n_cases"] == 2 and "perplexity_edited" not in point
    assert "fewer than" in point["perplexity_unavailable"] and "no perplexity" in caplog.text
    rows, cols = original[name].shape
    assert point["edit_norm"][name] == pytest.approx(0.01 * (rows * cols) ** 0.5, rel=1e-5)
    assert point["edit_spectral_norm"][name] == pytest.approx(point["edit_norm"][name], rel=1e-5)  # rank one


def test_compare_reads_digests_of_runs_made_elsewhere(tmp_path: Path, capsys):
    """``--compare ... --json`` saved to a file stands in for a run folder that is gone (another machine or
    session): the same table rows and the run in the overlay picture."""
    import shutil

    _sequential_run(tmp_path, "MEMIT", forgets=True)
    _sequential_run(tmp_path, "AlphaEdit", forgets=False)
    assert sm.main(["--compare", "MEMIT/run_000", "AlphaEdit/run_000", f"--results_dir={tmp_path}"]) == 0
    table = capsys.readouterr().out
    assert sm.main(["--compare", "MEMIT/run_000", f"--results_dir={tmp_path}", "--json"]) == 0
    digest = tmp_path / "memit_digest.json"
    digest.write_text(capsys.readouterr().out)
    shutil.rmtree(tmp_path / "MEMIT")
    assert sm.main(["--compare", str(digest), "AlphaEdit/run_000", f"--results_dir={tmp_path}", "--plot"]) == 0
    out = capsys.readouterr().out
    rows = lambda text: [line for line in text.splitlines() if line.split()[:1] in (["MEMIT"], ["AlphaEdit"])]
    assert rows(out) == rows(table) and len(rows(out)) == 4
    assert (tmp_path / "compare_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "MEMIT").exists()  # no per-run picture for a run that has no folder here
    runs = sm.compare([str(digest)], tmp_path)
    assert runs[0]["perplexity"] == 30.0 and runs[0]["downstream_last"]["mean_accuracy"] == pytest.approx(40.0)
    assert [p["edit_count"] for p in runs[0]["curve_points"]] == [0, 1, 2]


@pytest.mark.parametrize("content, message", [
    ("{not json", "corrupt digest"),
    ('[{"run": "run_000"}]', "entry 0 lacks alg_name"),
])
def test_bad_digest_named(tmp_path: Path, capsys, content, message):
    digest = tmp_path / "d.json"
    digest.write_text(content)
    assert sm.main(["--compare", str(digest), f"--results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(digest) in err and "Traceback" not in err
    assert sm.main(["--compare", str(tmp_path / "missing.json"), f"--results_dir={tmp_path}"]) == 2
    assert "digest file" in capsys.readouterr().err
