"""Where a long run stands: wall time per stage, kept across resumes, and one progress line per round.

A 2,000-edit run takes hours on a CPU; a researcher wants to know after each round how many edits are done,
where the time went (editing, the pre / post / final evaluations, the downstream checks and curve points) and when it will
end. ``RunClock`` keeps the seconds of each stage in ``run_NNN/timing.json`` (written atomically after every
round, so a resumed run adds to what the interrupted one measured) and estimates the time left from the
rounds this process has run.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

from util.io import atomic_write_json

STAGES = ("pre", "edit", "post", "downstream", "curves", "final")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class RunClock:
    """Seconds per stage of one run (``STAGES``), and the progress line after each round."""

    def __init__(self, path: Path, total_rounds: int, total_edits: int, final_evaluation: bool):
        self.path = Path(path)
        self.total_rounds, self.total_edits, self.final_evaluation = total_rounds, total_edits, final_evaluation
        self.seconds: Dict[str, float] = {stage: 0.0 for stage in STAGES}
        if self.path.exists():
            self.seconds.update(json.loads(self.path.read_text())["seconds"])
        self._round_seconds: List[float] = []  # rounds run by this process
        self._post_seconds_per_case: List[float] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise KeyError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def seconds_left(self, rounds_done: int) -> float:
        """Mean round of this process times the rounds left, plus the final evaluation at the post rate."""
        if not self._round_seconds:
            return float("nan")
        left = sum(self._round_seconds) / len(self._round_seconds) * (self.total_rounds - rounds_done)
        if self.final_evaluation and self._post_seconds_per_case:
            left += sum(self._post_seconds_per_case) / len(self._post_seconds_per_case) * self.total_edits
        return left

    def round_done(self, rounds_done: int, edits_done: int, round_seconds: float, post_cases: int,
                   post_seconds: float) -> str:
        """Record a finished round, save the times and return the progress line."""
        self._round_seconds.append(round_seconds)
        if post_cases:
            self._post_seconds_per_case.append(post_seconds / post_cases)
        self.save()
        stages = ", ".join(f"{stage} {format_duration(self.seconds[stage])}" for stage in STAGES if self.seconds[stage])
        left = self.seconds_left(rounds_done)
        return (f"round {rounds_done}/{self.total_rounds} done: {edits_done}/{self.total_edits} edits; "
                f"time so far: {stages}; about {format_duration(left)} left")

    def save(self) -> None:
        atomic_write_json(self.path, {"seconds": self.seconds, "total_seconds": sum(self.seconds.values())})
