"""The run clock: seconds per stage kept across resumes, the progress line and the time left."""
import json
import math

import pytest

from experiments.progress import RunClock, format_duration


def test_stages_add_up_and_survive_a_restart(tmp_path):
    path = tmp_path / "timing.json"
    clock = RunClock(path, total_rounds=4, total_edits=40, final_evaluation=False)
    with clock.stage("edit"):
        pass
    clock.seconds["edit"] = 10.0  # as if the block had taken ten seconds
    clock.round_done(1, 10, round_seconds=12.0, post_cases=10, post_seconds=1.0)
    saved = json.loads(path.read_text())
    assert saved["seconds"]["edit"] == 10.0 and saved["total_seconds"] == pytest.approx(10.0)
    resumed = RunClock(path, total_rounds=4, total_edits=40, final_evaluation=False)
    with resumed.stage("edit"):
        pass
    assert resumed.seconds["edit"] >= 10.0  # a resumed run adds to what was measured before
    with pytest.raises(KeyError, match="unknown stage 'eval'"):
        with resumed.stage("eval"):
            pass


def test_time_left_from_this_process_rounds_and_the_final_evaluation(tmp_path):
    clock = RunClock(tmp_path / "timing.json", total_rounds=5, total_edits=50, final_evaluation=True)
    assert math.isnan(clock.seconds_left(0))
    line = clock.round_done(2, 20, round_seconds=100.0, post_cases=10, post_seconds=5.0)
    # 3 rounds left at 100 s, and 50 final cases at 0.5 s each.
    assert clock.seconds_left(2) == pytest.approx(325.0)
    assert line.startswith("round 2/5 done: 20/50 edits;") and "about 5 min 25 s left" in line
    clock.round_done(3, 30, round_seconds=200.0, post_cases=10, post_seconds=15.0)
    assert clock.seconds_left(3) == pytest.approx(2 * 150.0 + 50 * 1.0)


def test_durations_read_as_a_person_writes_them():
    assert format_duration(42.4) == "42 s"
    assert format_duration(125) == "2 min 05 s"
    assert format_duration(3 * 3600 + 7 * 60 + 30) == "3 h 07 min"
