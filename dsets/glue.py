"""Data files of the downstream tasks (``DATA_DIR/glue/<task>.json``): found in the data folders, or built
from the Hugging Face ``datasets`` copy when the machine is online.

The folders are those of every data file (:func:`dsets.data_files.data_dir_candidates`), and the offline rule
and the network timeout are the same as for the other downloads (:func:`dsets.data_files.offline_switch`,
``NETWORK_TIMEOUT_S``). A task is anything with ``name``, ``data_file`` and ``hf_source`` (an
:class:`HFSource` or None), such as ``experiments.downstream.TaskSpec``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Union

from dsets.data_files import (NETWORK_TIMEOUT_S, DataFormatError, data_dir_candidates, host_reachable,
                              offline_switch)
from util.errors import ECEError
from util.io import atomic_write_json

LOG = logging.getLogger(__name__)

GLUE_SUBDIR = "glue"
HF_HOST = "huggingface.co"
MAX_BUILT_EXAMPLES = 2000


@dataclass(frozen=True)
class HFSource:
    """Where a missing task file can be rebuilt from: ``datasets.load_dataset(path, config, split=split)``,
    each row turned into a file record by ``convert`` (default: the row unchanged)."""

    path: str
    config: Optional[str]
    split: str
    convert: Optional[Callable[[dict], dict]] = None

    def describe(self) -> str:
        return f"{self.path}/{self.config} ({self.split})" if self.config else f"{self.path} ({self.split})"


class DownstreamDataNotFoundError(ECEError, FileNotFoundError):
    """A task file that is in none of the data folders and could not be built."""


def hub_reachable() -> bool:
    """Whether downloads are allowed (no offline switch) and the Hugging Face hub answers in time."""
    return offline_switch() is None and host_reachable(HF_HOST, NETWORK_TIMEOUT_S)


def _build_from_hf(task, dest: Path) -> None:
    import datasets  # optional dependency, only for building a missing file

    source = task.hf_source
    LOG.info("building %s from Hugging Face datasets %s", dest, source.describe())
    rows = datasets.load_dataset(source.path, source.config, split=source.split).shuffle(seed=0)
    rows = rows.select(range(min(len(rows), MAX_BUILT_EXAMPLES)))
    convert = source.convert or dict
    atomic_write_json(dest, [convert(dict(row)) for row in rows])


def task_file(task, data_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The task's data file: found in the data folders, or built from Hugging Face ``datasets`` into the
    first folder when the machine is online."""
    candidates = data_dir_candidates(data_dir)
    for folder, _ in candidates:
        path = folder / GLUE_SUBDIR / task.data_file
        if path.is_file():
            return path
    dest = candidates[0][0] / GLUE_SUBDIR / task.data_file
    searched = ", ".join(f"{folder / GLUE_SUBDIR} ({origin})" for folder, origin in candidates)
    fix = (f"copy {task.data_file} into {dest.parent}, or pass data_dir / set ECE_DATA_DIR to a folder whose "
           f"{GLUE_SUBDIR}/ holds it")
    problem = None
    if task.hf_source is None:
        problem = "the task has no Hugging Face source to build it from"
    elif offline_switch() is not None:
        problem = f"the machine is offline ({offline_switch()} is set), so it cannot be built from Hugging Face " \
                  f"datasets {task.hf_source.describe()}"
    elif not hub_reachable():
        problem = f"the machine is offline ({HF_HOST} does not answer within {NETWORK_TIMEOUT_S:g} s), so it " \
                  f"cannot be built from Hugging Face datasets {task.hf_source.describe()}"
    else:
        try:
            _build_from_hf(task, dest)
            return dest
        except ImportError:
            problem = "the 'datasets' package is not installed (pip install datasets), so it cannot be built"
        except Exception as exc:  # network errors, renamed datasets, ...: the same helpful error
            problem = f"building it from Hugging Face datasets {task.hf_source.describe()} failed: " \
                      f"{type(exc).__name__}: {exc}"
    if task.hf_source is not None:
        fix += f", or run once online with the 'datasets' package to build it from {task.hf_source.describe()}"
    raise DownstreamDataNotFoundError(
        f"downstream task '{task.name}': data file {GLUE_SUBDIR}/{task.data_file} not found; searched "
        f"{searched}; {problem}. Fix: {fix}."
    )


def load_examples(task, data_dir: Optional[Union[str, os.PathLike]] = None) -> List[dict]:
    """The task file's examples (a JSON list of objects)."""
    path = task_file(task, data_dir)
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataFormatError(f"{path}: expected a JSON list of example objects")
    return data
