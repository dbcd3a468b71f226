"""Second-moment statistics ``C0 = E[k k^T]`` of rewrite-module inputs over generic text.

All requested layers are measured in one forward pass per batch, which stops after the last of them.
Results are cached per (model, module, corpus, sample count, sample length, dtype, BOS rule) in
STATS_DIR and written atomically, so an interrupted computation never leaves a partial file behind.

Every token counts, a leading BOS included, as upstream ``layer_stats`` does (kmeng01/memit
rome/layer_stats.py:97-104 flattens every position the attention mask keeps); ``mom2_skip_bos`` leaves
the BOS position out (its key is an outlier that no edited prompt reads at the fact token).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from dsets.data_files import data_dir_candidates
from util.hooks import TraceDict
from util.io import atomic_torch_save
from util.models import hidden_states_only_kwargs, model_device
from util.paths import get_paths, safe_name
from util.tokens import leading_special_ids
from util.weights import read_weight

LOG = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CorpusNotFoundError(FileNotFoundError):
    pass


def load_corpus_text(name: str, data_dir: Optional[Path] = None) -> str:
    """Generic text for the statistics.

    ``wikitext``: ``DATA_DIR/wikitext/*.raw`` (WikiText raw files), else Hugging Face ``wikitext`` when
    online. ``wikipedia``: Hugging Face ``wikimedia/wikipedia`` (online only). Anything else is a path to
    a text file or a folder of ``.txt``/``.raw`` files.
    """
    if name == "wikitext":
        searched = []
        for folder, _ in data_dir_candidates(data_dir):
            files = sorted((folder / "wikitext").glob("*.raw"))
            searched.append(str(folder / "wikitext"))
            if files:
                return "\n".join(f.read_text(encoding="utf-8") for f in files)
        return _hub_text("wikitext", "wikitext-103-raw-v1", searched)
    if name == "wikipedia":
        return _hub_text("wikimedia/wikipedia", "20231101.en", [])
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted([*path.glob("*.txt"), *path.glob("*.raw")])
        if files:
            return "\n".join(f.read_text(encoding="utf-8") for f in files)
    raise CorpusNotFoundError(
        f"mom2_dataset '{name}' is neither 'wikitext', 'wikipedia' nor a text file or folder of .txt/.raw files"
    )


def _hub_text(dataset: str, config: str, searched: List[str], max_chars: int = 20_000_000) -> str:
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset, config, split="train", streaming=True)
        parts, size = [], 0
        for row in rows:
            parts.append(row["text"])
            size += len(row["text"])
            if size >= max_chars:
                break
        return "\n".join(parts)
    except Exception as e:  # offline, or the hub refused
        raise CorpusNotFoundError(
            f"no local text for the statistics (searched {searched or 'nothing'}) and the Hugging Face dataset "
            f"'{dataset}' could not be loaded ({type(e).__name__}: {str(e)[:200]}). Put WikiText raw files "
            "(wiki.test.raw, ...) in DATA_DIR/wikitext/ (see --data_dir / ECE_DATA_DIR), or set mom2_dataset "
            "to the path of a text file."
        ) from e


def text_chunks(tok, text: str, n_samples: int, sample_length: int) -> torch.Tensor:
    """``[n, sample_length]`` token ids of consecutive chunks (with the tokenizer's BOS in front, if any)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    bos = leading_special_ids(tok)
    body = sample_length - len(bos)
    needed = n_samples * body
    ids: List[int] = []
    for start in range(0, len(lines), 2000):
        ids += tok("\n".join(lines[start : start + 2000]) + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            break
    available = len(ids) // body
    if available < n_samples:
        LOG.warning("corpus has %d chunks of %d tokens; %d requested", available, sample_length, n_samples)
    n = min(n_samples, available)
    if n == 0:
        raise CorpusNotFoundError(f"the statistics corpus is shorter than one chunk of {sample_length} tokens")
    chunks = torch.tensor(ids[: n * body]).view(n, body)
    if bos:
        chunks = torch.cat([torch.tensor(bos).expand(n, len(bos)), chunks], dim=1)
    return chunks


def stats_file(stats_dir: Path, model_name: str, hparams, layer: int) -> Path:
    corpus = safe_name(Path(hparams.mom2_dataset).name if os.sep in hparams.mom2_dataset else hparams.mom2_dataset)
    size = f"{hparams.mom2_n_samples}x{hparams.mom2_sample_length}"
    if getattr(hparams, "mom2_keys_per_dimension", None):
        size += f"_{float(hparams.mom2_keys_per_dimension):g}keys_per_dim"
    if not getattr(hparams, "mom2_skip_bos", False):
        size += "_bos"  # files without the tag were computed without the BOS position
    folder = stats_dir / safe_name(model_name) / f"{corpus}_{size}"
    return folder / f"{hparams.rewrite_module(layer)}_{hparams.mom2_dtype}.pt"


def chunks_needed(model, hparams, bos_length: int) -> int:
    """``mom2_n_samples``, or fewer when ``mom2_keys_per_dimension`` keys per input dimension suffice."""
    if not getattr(hparams, "mom2_keys_per_dimension", None):
        return hparams.mom2_n_samples
    d_in = read_weight(model, hparams.rewrite_module(hparams.layers[0])).shape[1]
    keys_per_chunk = hparams.mom2_sample_length - bos_length
    return min(hparams.mom2_n_samples, math.ceil(hparams.mom2_keys_per_dimension * d_in / keys_per_chunk))


@torch.no_grad()
def compute_second_moments(
    model, tok, module_names: Sequence[str], chunks: torch.Tensor, skip_positions: int = 0, batch_size: int = 16
) -> Dict[str, torch.Tensor]:
    """``E[k k^T]`` (float64, on CPU) of the inputs of ``module_names`` over all chunk tokens.

    ``skip_positions`` leading positions (a BOS token, with ``mom2_skip_bos``) are left out.
    """
    device = model_device(model)
    sums: Dict[str, torch.Tensor] = {}
    count = 0
    for start in tqdm(range(0, len(chunks), batch_size), desc="second moments", unit="batch"):
        ids = chunks[start : start + batch_size].to(device)
        with TraceDict(model, module_names, retain_input=True, retain_output=False, stop=True) as traces:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **hidden_states_only_kwargs(model))
        for name in module_names:
            keys = traces[name].input[:, skip_positions:].reshape(-1, traces[name].input.shape[-1]).float()
            moment = (keys.T @ keys).double()
            sums[name] = moment if name not in sums else sums[name] + moment
        count += ids.shape[0] * (ids.shape[1] - skip_positions)
    return {name: (total / count).cpu() for name, total in sums.items()}


def load_or_compute_second_moments(
    model, tok, hparams, layers: Sequence[int], model_name: str,
    stats_dir: Optional[Path] = None, data_dir: Optional[Path] = None,
) -> Dict[int, torch.Tensor]:
    """``{layer: C0}`` in ``hparams.mom2_dtype`` on CPU; computes only the layers not yet cached."""
    stats_dir = Path(stats_dir or get_paths().stats_dir)
    dtype = DTYPES[hparams.mom2_dtype]
    result: Dict[int, torch.Tensor] = {}
    for layer in layers:
        path = stats_file(stats_dir, model_name, hparams, layer)
        if path.exists():
            result[layer] = torch.load(path, map_location="cpu", weights_only=True)["second_moment"].to(dtype)
            LOG.info("loaded second moment of layer %d from %s", layer, path)
    missing = [layer for layer in layers if layer not in result]
    if not missing:
        return result
    text = load_corpus_text(hparams.mom2_dataset, data_dir)
    bos_length = len(leading_special_ids(tok))
    skipped = bos_length if hparams.mom2_skip_bos else 0
    chunks = text_chunks(tok, text, chunks_needed(model, hparams, skipped), hparams.mom2_sample_length)
    LOG.info("computing second moments of layers %s over %d chunks x %d tokens", missing, *chunks.shape)
    names = {layer: hparams.rewrite_module(layer) for layer in missing}
    moments = compute_second_moments(model, tok, list(names.values()), chunks, skip_positions=skipped)
    for layer, name in names.items():
        value = moments[name].to(dtype)
        atomic_torch_save(stats_file(stats_dir, model_name, hparams, layer),
                          {"second_moment": value, "n_tokens": int(chunks.numel()), "module": name,
                           "corpus": hparams.mom2_dataset})
        result[layer] = value
    return {layer: result[layer] for layer in layers}
