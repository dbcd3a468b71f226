"""Default folders of the project, read from globals.yml with environment overrides.

Resolution order for every folder: the environment variable ``ECE_<NAME>`` (for example
``ECE_DATA_DIR``), then the value in ``globals.yml``. Relative paths are taken from the repository root.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from util.errors import SettingError

REPO_ROOT = Path(__file__).resolve().parent.parent
GLOBALS_FILE = REPO_ROOT / "globals.yml"
FOLDER_KEYS = ("RESULTS_DIR", "DATA_DIR", "STATS_DIR", "MODELS_DIR", "HPARAMS_DIR")


@dataclass(frozen=True)
class Paths:
    results_dir: Path
    data_dir: Path
    stats_dir: Path
    models_dir: Path
    hparams_dir: Path


def _read_globals() -> dict:
    if not GLOBALS_FILE.exists():
        return {}
    with open(GLOBALS_FILE) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise SettingError(f"{GLOBALS_FILE} must be a mapping of KEY: value, got {type(values).__name__}")
    return values


def _resolve(value: str) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else REPO_ROOT / path


def get_paths() -> Paths:
    """Folders in force now (read every call, so tests can change the environment)."""
    values = _read_globals()
    folders = {}
    for key in FOLDER_KEYS:
        value = os.environ.get(f"ECE_{key}") or values.get(key) or key.split("_")[0].lower()
        folders[key.lower()] = _resolve(value)
    return Paths(**folders)


def safe_name(name: str) -> str:
    """A model id or path turned into one folder name (``openai/gpt2`` -> ``openai_gpt2``)."""
    return str(name).strip("/").replace("/", "_").replace("\\", "_").replace(":", "_")
