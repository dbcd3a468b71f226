"""Data files: lookup order, the not-found error, downloads, record validation and the real data sets."""
from __future__ import annotations

import io
import json
import threading

import pytest

import dsets.data_files as data_files
from dsets import (
    CounterFactDataset,
    DataFileNotFoundError,
    KnownsDataset,
    MENDQADataset,
    MultiCounterFactDataset,
    find_data_file,
    locate_data_file,
)
from dsets.zsre import convert_zsre_record


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Three empty folders standing for --data_dir, ECE_DATA_DIR and DATA_DIR of globals.yml."""
    arg, env, glob = (tmp_path / name for name in ("arg", "env", "globals"))
    for folder in (arg, env, glob):
        folder.mkdir()
    monkeypatch.setenv("ECE_DATA_DIR", str(env))
    monkeypatch.setattr(data_files, "_globals_data_dir", lambda: glob)
    for name in data_files.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    return arg, env, glob


def _write(folder, name, obj):
    path = folder / name
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------- lookup order

def test_data_dir_argument_wins_then_env_then_globals(folders, monkeypatch):
    arg, env, glob = folders
    for folder in folders:
        _write(folder, "known_1000.json", [])
    assert find_data_file("known_1000.json", arg) == arg / "known_1000.json"
    assert find_data_file("known_1000.json") == env / "known_1000.json"
    monkeypatch.delenv("ECE_DATA_DIR")
    assert find_data_file("known_1000.json") == glob / "known_1000.json"


def test_later_folder_used_when_earlier_ones_lack_the_file(folders):
    arg, env, glob = folders
    _write(glob, "known_1000.json", [])
    assert find_data_file("known_1000.json", arg) == glob / "known_1000.json"
    _write(env, "known_1000.json", [])
    assert find_data_file("known_1000.json", arg) == env / "known_1000.json"


def test_alternative_names_are_checked_per_folder(folders):
    arg, env, glob = folders
    _write(env, "zsre_mend_eval.json", [])
    _write(glob, "zsre_mem_eval.json", [])
    # the env folder comes first, even though it holds only the second accepted name
    assert locate_data_file(("zsre_mem_eval.json", "zsre_mend_eval.json"), arg) == env / "zsre_mend_eval.json"


# ---------------------------------------------------------------- not found / download

def test_missing_everywhere_error_names_file_folders_and_fix(folders, monkeypatch):
    arg, env, glob = folders
    network_used = lambda *a, **k: pytest.fail("network used")  # no URL is known: nothing to download
    for module, name in ((data_files, "host_reachable"), (data_files, "download_file"),
                         (data_files.socket, "create_connection"), (data_files.urllib.request, "urlopen")):
        monkeypatch.setattr(module, name, network_used)
    with pytest.raises(DataFileNotFoundError) as info:
        find_data_file("no_such_file.json", arg)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "no_such_file.json" in message
    for folder in (arg, env, glob):
        assert str(folder) in message
    assert "--data_dir" in message and "ECE_DATA_DIR" in message and "copy the file" in message
    assert message.index(str(arg)) < message.index(str(env)) < message.index(str(glob))
    assert info.value.searched == [arg, env, glob]


def test_failed_download_goes_to_first_folder_and_explains(folders, monkeypatch):
    arg, _, _ = folders
    attempts = []

    def failing_download(url, dest, timeout=data_files.NETWORK_TIMEOUT_S):
        attempts.append((url, dest))
        raise OSError("network is unreachable")

    monkeypatch.setattr(data_files, "download_file", failing_download)
    with pytest.raises(DataFileNotFoundError) as info:
        find_data_file("counterfact.json", arg)
    assert attempts == [(data_files.DATA_URLS["counterfact.json"], arg / "counterfact.json")]
    message = str(info.value)
    assert "network is unreachable" in message and "https://rome.baulab.info/data/dsets/counterfact.json" in message


def test_offline_switch_skips_download(folders, monkeypatch):
    monkeypatch.setenv(data_files.OFFLINE_ENV, "1")
    monkeypatch.setattr(data_files, "download_file", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(DataFileNotFoundError, match="ECE_OFFLINE"):
        find_data_file("known_1000.json")


def test_download_is_not_attempted_when_disabled(folders, monkeypatch):
    monkeypatch.setattr(data_files, "download_file", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(DataFileNotFoundError, match="not downloaded automatically"):
        find_data_file("idf.npy", download=False)


def test_zsre_downloads_under_its_published_name(folders, monkeypatch):
    arg, _, _ = folders
    attempts = []
    monkeypatch.setattr(data_files, "download_file", lambda url, dest, **k: attempts.append(dest) or dest)
    find_data_file(("zsre_mem_eval.json", "zsre_mend_eval.json"), arg)
    assert attempts == [arg / "zsre_mend_eval.json"]


def test_download_writes_atomically_into_first_folder(folders, monkeypatch):
    arg, env, _ = folders
    payload = json.dumps([{"subject": "x"}]).encode()

    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    monkeypatch.setattr(data_files, "host_reachable", lambda host, timeout: True)
    monkeypatch.setattr(data_files.urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    path = find_data_file("known_1000.json", arg)
    assert path == arg / "known_1000.json"
    assert path.read_bytes() == payload
    assert sorted(p.name for p in arg.iterdir()) == ["known_1000.json"]  # no temporary file left
    assert not (env / "known_1000.json").exists()


def test_connection_check_is_bounded_in_time(monkeypatch):
    """host_reachable gives up after its timeout while the connection attempt still hangs (a lookup that
    ignores socket timeouts), instead of waiting for it."""
    release, finished = threading.Event(), threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)  # the safety limit only matters when host_reachable waits for the attempt
        finished.set()
        raise OSError("timed out")

    monkeypatch.setattr(data_files.socket, "create_connection", hang)
    try:
        assert data_files.host_reachable("rome.baulab.info", timeout=0.2) is False
        assert not finished.is_set()  # it returned while the attempt was still hanging
    finally:
        release.set()


@pytest.mark.parametrize("switch", ["ECE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_one_offline_rule_for_every_download(folders, monkeypatch, switch):
    """The data files and the downstream tasks' files obey the same switches and wait the same time."""
    from dsets import glue
    from experiments.downstream import DOWNSTREAM_TASKS

    arg, _, _ = folders
    attempts = []
    monkeypatch.setattr(data_files, "host_reachable", lambda *a, **k: attempts.append(a) or True)
    monkeypatch.setenv(switch, "true")
    with pytest.raises(DataFileNotFoundError, match=f"Downloading is disabled \\({switch} is set\\)"):
        find_data_file("known_1000.json", arg)
    with pytest.raises(glue.DownstreamDataNotFoundError, match=f"offline \\({switch} is set\\)"):
        glue.task_file(DOWNSTREAM_TASKS["sst2"], arg)
    assert attempts == []  # no connection tried
    assert glue.NETWORK_TIMEOUT_S is data_files.NETWORK_TIMEOUT_S


def test_malformed_data_file_is_a_project_error(folders):
    from util.errors import ECEError

    arg, _, _ = folders
    _write(arg, "known_1000.json", {"not": "a list"})
    with pytest.raises(data_files.DataFormatError, match="known_1000.json: expected a JSON list") as info:
        KnownsDataset(arg)
    assert isinstance(info.value, ECEError) and isinstance(info.value, ValueError)


# ---------------------------------------------------------------- CounterFact

def _cf_record(case_id=7, prompt="{} plays the", subject="Lionel Messi"):
    return {
        "case_id": case_id,
        "requested_rewrite": {"prompt": prompt, "relation_id": "P641", "subject": subject,
                              "target_new": {"str": "tennis", "id": "Q1"}, "target_true": {"str": "soccer", "id": "Q2"}},
        "paraphrase_prompts": [], "neighborhood_prompts": [], "attribute_prompts": [], "generation_prompts": [],
    }


@pytest.mark.parametrize(
    "prompt, subject, problem",
    [("plays the", "Lionel Messi", "exactly once"), ("{} and {} play", "Lionel Messi", "exactly once"),
     ("{} plays the", "", "subject"), ("{} plays {the}", "Lionel Messi", "braces")],
)
def test_invalid_counterfact_record_is_named(tmp_path, prompt, subject, problem):
    path = _write(tmp_path, "counterfact.json", [_cf_record(3), _cf_record(4242, prompt, subject)])
    with pytest.raises(ValueError) as info:
        CounterFactDataset(tmp_path)
    message = str(info.value)
    assert "4242" in message and str(path) in message and problem in message


def test_counterfact_size_limits_validation(tmp_path):
    _write(tmp_path, "counterfact.json", [_cf_record(1), _cf_record(2, "no placeholder")])
    assert [r["case_id"] for r in CounterFactDataset(tmp_path, size=1)] == [1]
    with pytest.raises(ValueError, match="size"):
        CounterFactDataset(tmp_path, size=-1)


def test_real_counterfact(data_dir):
    ds = CounterFactDataset(data_dir)
    assert len(ds) == 1856
    assert ds[0]["case_id"] == 11 and ds[-1]["case_id"] == 21884
    assert ds[0]["requested_rewrite"]["target_true"]["str"] == "soccer"
    assert all(len(r["neighborhood_prompts"]) == 10 for r in ds)
    first = CounterFactDataset(data_dir, size=5)
    assert len(first) == 5 and [r["case_id"] for r in first] == [r["case_id"] for r in ds[:5]]
    mcf = MultiCounterFactDataset(data_dir, size=3)
    assert mcf.path.name == "multi_counterfact.json" and len(mcf) == 3


# ---------------------------------------------------------------- zsRE

def test_real_zsre_conversion(data_dir):
    raw = json.loads((data_dir / "zsre_mem_eval.json").read_text())
    ds = MENDQADataset(data_dir)
    assert len(ds) == len(raw) == 1037
    for i, (record, source) in enumerate(zip(ds, raw)):
        rewrite = record["requested_rewrite"]
        assert record["case_id"] == i
        assert rewrite["prompt"].count("{}") == 1
        assert rewrite["prompt"].format(rewrite["subject"]) == source["src"]
        assert rewrite["target_new"]["str"] == source["answers"][0]
        assert record["paraphrase_prompts"] == [source["rephrase"]]
        assert record["neighborhood_prompts"] == [{"prompt": source["loc"] + "?", "target": source["loc_ans"]}]
    first = ds[1]["requested_rewrite"]
    assert first["prompt"] == "Which family does {} belong to?" and first["subject"] == "Ramalinaceae"
    assert first["target_new"]["str"] == "Lecanorales"
    alt = MENDQADataset(data_dir, size=2, edit_target="alt")
    assert len(alt) == 2
    assert alt[1]["requested_rewrite"]["target_new"]["str"] == "Lamiinae"
    assert alt[1]["requested_rewrite"]["target_true"]["str"] == "Lecanorales"


def test_zsre_subject_not_in_question(tmp_path):
    bad = {"subject": "Volvo B12M", "src": "What company made the B12M bus?", "rephrase": "r", "alt": "a",
           "answers": ["Volvo Buses"], "loc": "nq question: who", "loc_ans": "x", "pred": "p"}
    good = dict(bad, src="What company made Volvo B12M?")
    _write(tmp_path, "zsre_mem_eval.json", [good, bad])
    with pytest.raises(ValueError) as info:
        MENDQADataset(tmp_path)
    message = str(info.value)
    assert "record 1" in message and "Volvo B12M" in message and "What company made the B12M bus?" in message


def test_zsre_subject_replaced_once():
    raw = {"subject": "Io", "src": "Io orbits Io?", "rephrase": "r", "answers": ["Jupiter"], "loc": "nq question: q",
           "loc_ans": "a", "pred": "Saturn"}
    record = convert_zsre_record(raw, 5)
    assert record["requested_rewrite"]["prompt"] == "{} orbits Io?"
    assert record["requested_rewrite"]["target_true"]["str"] == "Saturn"
    assert record["case_id"] == 5


def test_real_knowns(data_dir):
    ds = KnownsDataset(data_dir)
    assert len(ds) == 1209
    assert ds[0]["subject"] == "Vinson Massif" and ds[0]["attribute"] == "Antarctica"
