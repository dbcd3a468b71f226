"""scripts/sequential_runs.sh: the sequential-editing table's runs, resumed when started again."""
import json
import os
import subprocess
import sys

import pytest

from util.paths import REPO_ROOT


@pytest.mark.slow
def test_sequential_runs_script_runs_resumes_and_compares(tmp_path, data_dir):
    """MEMIT (its AlphaEdit-row setting: --sequential, loops of 20) on the embedded model, two rounds of one
    edit with a checkpoint after each; a second start resumes the finished run and changes no file."""
    results = tmp_path / "results"
    env = dict(os.environ, ECE_DATA_DIR=str(data_dir), ECE_STATS_DIR=str(tmp_path / "stats"), RESULTS=str(results),
               METHODS="MEMIT", EDITS="2", ROUND="1", DOWNSTREAM_STEPS="1", DEVICE="cpu", PYTHON=sys.executable,
               OVERRIDES="mom2_n_samples=20 v_num_grad_steps=2",
               EXTRA="--downstream_examples 2 --skip_free_generation --skip_generation_tests")
    script = ["bash", str(REPO_ROOT / "scripts" / "sequential_runs.sh")]
    first = subprocess.run(script, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    run_dir = results / "MEMIT" / "run_000"
    params = json.loads((run_dir / "params.json").read_text())
    assert params["sequential"] is True and params["hparams"]["z_requests_per_loop"] == 20
    assert params["hparams"]["mom2_n_samples"] == 20 and params["dataset_size_limit"] == 2
    cases = sorted(run_dir.glob("1_edits-case_*.json"))
    assert len(cases) == 2 and all("final" in json.loads(p.read_text()) for p in cases)
    assert sorted(p.name for p in (run_dir / "curves").glob("*.json")) == [
        "edits_000000.json", "edits_000001.json", "edits_000002.json"]
    assert len(list((run_dir / "glue_eval").glob("*.json"))) == 3
    table = [line.split() for line in first.stdout.splitlines() if line.startswith("MEMIT ")]
    assert [row[3] for row in table] == ["post", "final"]
    assert (results / "compare_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "curves.png").exists()

    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*.json")) if p.name != "timing.json"}
    again = subprocess.run(script, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(resumed)" in again.stdout
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*.json")) if p.name != "timing.json"} == before

    env["METHODS"] = "ROME"
    unknown = subprocess.run(script, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown method 'ROME'" in unknown.stderr
