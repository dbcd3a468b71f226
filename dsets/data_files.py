"""Finding data files: the user's folder, the environment, globals.yml, and (when online) the web.

Search order for every file (docs/DESIGN.md section 6):

1. the ``data_dir`` argument (the CLI's ``--data_dir``; relative paths are taken from the current directory),
2. the ``ECE_DATA_DIR`` environment variable,
3. ``DATA_DIR`` in ``globals.yml`` (relative paths are taken from the repository root).

A file found nowhere is downloaded from its canonical URL (``DATA_URLS``) into the first of those folders,
atomically and with a progress bar. Without network (or with ``ECE_OFFLINE=1``) the lookup fails fast with a
``DataFileNotFoundError`` that names the file, every folder searched and how to provide the file.

Every download of the project (these files, the downstream tasks' files in ``dsets.glue``) follows one rule,
:func:`offline`, and waits at most ``NETWORK_TIMEOUT_S`` seconds for the network.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from util import paths as ece_paths
from util.errors import ECEError
from util.io import atomic_write

LOG = logging.getLogger(__name__)

ROME_DSETS_URL = "https://rome.baulab.info/data/dsets"
MEMIT_DSETS_URL = "https://memit.baulab.info/data/dsets"

# Canonical locations used by ROME/MEMIT. The zsRE file is published as ``zsre_mend_eval.json`` (the full
# 19,086-record eval split); ``zsre_mem_eval.json`` is the name of the local 1,037-record copy and has no URL.
# The attribute snippets and tf-idf statistics are listed for the error message only: the loaders in
# ``dsets.attr_snippets`` never download them.
DATA_URLS = {
    "counterfact.json": f"{ROME_DSETS_URL}/counterfact.json",
    "known_1000.json": f"{ROME_DSETS_URL}/known_1000.json",
    "zsre_mend_eval.json": f"{ROME_DSETS_URL}/zsre_mend_eval.json",
    "multi_counterfact.json": f"{MEMIT_DSETS_URL}/multi_counterfact.json",
    "attribute_snippets.json": f"{ROME_DSETS_URL}/attribute_snippets.json",
    "idf.npy": f"{ROME_DSETS_URL}/idf.npy",
    "tfidf_vocab.json": f"{ROME_DSETS_URL}/tfidf_vocab.json",
}

NETWORK_TIMEOUT_S = 5.0
OFFLINE_ENV = "ECE_OFFLINE"
# The Hugging Face switches count too: a machine marked offline for the hub is offline for every download.
OFFLINE_ENVS = (OFFLINE_ENV, "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
TRUE_VALUES = ("1", "true", "yes", "on")


def offline_switch() -> Optional[str]:
    """The environment variable that turns downloads off (``ECE_OFFLINE=1``, ...), or None."""
    return next((name for name in OFFLINE_ENVS if os.environ.get(name, "").strip().lower() in TRUE_VALUES), None)


class DataFormatError(ECEError, ValueError):
    """A data file whose content is not what its loader expects; the message names the file."""


class DataFileNotFoundError(ECEError, FileNotFoundError):
    """A data file that is in none of the data folders and could not be downloaded."""

    def __init__(self, message: str, filename: str, searched: Sequence[Path], url: Optional[str]):
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.searched = list(searched)
        self.url = url

    def __str__(self) -> str:  # OSError would print "[Errno None] None: <filename>"
        return self.message


def _globals_data_dir() -> Path:
    """``DATA_DIR`` from globals.yml alone (``get_paths`` would let ``ECE_DATA_DIR`` mask it)."""
    value = ece_paths._read_globals().get("DATA_DIR") or "data"
    return ece_paths._resolve(value)


def data_dir_candidates(data_dir: Optional[Union[str, os.PathLike]] = None) -> List[Tuple[Path, str]]:
    """``(folder, where it came from)`` in search order, without duplicates."""
    candidates: List[Tuple[Path, str]] = []
    if data_dir is not None and str(data_dir) != "":
        candidates.append((Path(data_dir).expanduser().resolve(), "--data_dir"))
    env = os.environ.get("ECE_DATA_DIR")
    if env:
        candidates.append((ece_paths._resolve(env), "ECE_DATA_DIR"))
    candidates.append((_globals_data_dir(), "DATA_DIR in globals.yml"))
    unique: List[Tuple[Path, str]] = []
    for folder, origin in candidates:
        if all(folder != seen for seen, _ in unique):
            unique.append((folder, origin))
    return unique


def _names(filename: Union[str, Sequence[str]]) -> List[str]:
    return [filename] if isinstance(filename, str) else list(filename)


def locate_data_file(
    filename: Union[str, Sequence[str]], data_dir: Optional[Union[str, os.PathLike]] = None
) -> Optional[Path]:
    """The first existing file among the candidate folders, or None. Never downloads.

    ``filename`` may be a list of accepted names; each folder is checked for all of them, in order.
    """
    for folder, _ in data_dir_candidates(data_dir):
        for name in _names(filename):
            path = folder / name
            if path.is_file():
                return path
    return None


def host_reachable(host: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a connection to ``host``:443 opens within ``timeout`` seconds, name lookup included (run in a
    thread because ``getaddrinfo`` ignores socket timeouts)."""
    result = {}

    def lookup() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result.get("ok"))


def download_file(url: str, dest: Path, timeout: float = NETWORK_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically (temporary file, then rename) with a tqdm bar."""
    from tqdm.auto import tqdm

    host = urllib.parse.urlparse(url).hostname or ""
    if not host_reachable(host, timeout):
        raise OSError(f"cannot reach host '{host}' within {timeout:g} s (offline?)")
    LOG.info("downloading %s to %s", url, dest)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))

        atomic_write(dest, write)
    return dest


def _not_found_message(names: List[str], searched, url: Optional[str], problem: str) -> str:
    folders = "\n".join(f"  - {folder} ({origin})" for folder, origin in searched)
    name = names[0] if len(names) == 1 else " or ".join(repr(n) for n in names)
    source = f" (it is published at {url})" if url else ""
    return (
        f"data file {name} not found. Folders searched, in order:\n{folders}\n{problem}\n"
        f"To fix it: pass --data_dir DIR (data_dir=DIR in Python), set the environment variable ECE_DATA_DIR=DIR, "
        f"or copy the file into one of the folders above{source}."
    )


def find_data_file(
    filename: Union[str, Sequence[str]],
    data_dir: Optional[Union[str, os.PathLike]] = None,
    download: bool = True,
) -> Path:
    """Path of a data file, downloading it into the first candidate folder if needed and possible.

    Raises ``DataFileNotFoundError`` (a ``FileNotFoundError``) when the file cannot be provided.
    """
    names = _names(filename)
    found = locate_data_file(names, data_dir)
    if found is not None:
        return found
    searched = data_dir_candidates(data_dir)
    download_name = next((n for n in names if n in DATA_URLS), None)
    url = DATA_URLS.get(download_name) if download_name else None
    if url is None:
        problem = "No download URL is known for it."
    elif not download:
        problem = "It is not downloaded automatically."
    elif offline_switch() is not None:
        problem = f"Downloading is disabled ({offline_switch()} is set)."
    else:
        dest = searched[0][0] / download_name
        try:
            return download_file(url, dest)
        except Exception as e:  # any network or file-system failure becomes the same helpful error
            LOG.warning("download of %s failed: %s", url, e)
            problem = f"Downloading it from {url} failed: {e}"
    raise DataFileNotFoundError(_not_found_message(names, searched, url, problem), names[0], [f for f, _ in searched], url)
