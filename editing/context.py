"""Caches owned by one editing run: context templates and second-moment statistics.

No module-level caches: a run creates one ``EditContext`` and passes it to every ``apply_*`` call,
so nothing leaks between runs or tests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from util.generate import generate_texts
from util.tokens import prompt_ids

LOG = logging.getLogger(__name__)

TEMPLATE_SEED_PROMPTS = ("The", "Therefore", "Because", "I", "You")
TEMPLATE_STYLES = ("memit", "rome")


def _document_start_text(tok) -> str:
    """The text ROME seeds its templates with (GPT-2's ``<|endoftext|>``): empty when the tokenizer adds
    a document-start token itself, else that token's text."""
    if len(prompt_ids(tok, "")) > 0:
        return ""
    start = tok.bos_token or tok.eos_token
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start ROME's context templates from")
    return start


def _sample_prefixes(model, tok, prompts: Sequence[str], total_tokens: int, seed: int) -> List[str]:
    """Top-5 samples of ``total_tokens`` tokens in all, prompt included (generate_fast's ``max_out_len``),
    with special tokens and line breaks removed."""
    texts: List[str] = []
    by_length: Dict[int, List[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt_ids(tok, prompt)), []).append(i)
    out: Dict[int, str] = {}
    for length, members in by_length.items():
        new_tokens = max(total_tokens - length, 1)
        generated = generate_texts(model, tok, [prompts[i] for i in members], max_new_tokens=new_tokens,
                                   do_sample=True, top_k=5, seed=seed)
        for i, text in zip(members, generated):
            out[i] = text
    for i in range(len(prompts)):
        text = out[i]
        for special in tok.all_special_tokens:
            text = text.replace(special, "")
        texts.append(text.replace("\n", " ").strip())
    return texts


def generate_context_templates(model, tok, length_params: Sequence[Sequence[int]], seed: int = 0,
                               style: str = "memit") -> List[List[str]]:
    """Context templates as the reference implementations build them, as groups of templates.

    ``memit`` (memit/memit_main.py:290-309): ``[["{}"], [prefixes of each length ...], ...]``; each
    prefix is a top-5 sample of ``length`` tokens in all, started from one of five seed words, braces
    replaced by spaces, with ``". {}"`` appended. ``rome`` (rome/rome_main.py:213-236): one flat list,
    ``"{}"`` and then samples started from the document-start token, ``count`` of each length; ROME
    weighs them all alike, so callers flatten the groups.
    """
    if style not in TEMPLATE_STYLES:
        raise ValueError(f"unknown context template style {style!r}; use one of {TEMPLATE_STYLES}")
    groups: List[List[str]] = [["{}"]]
    for k, (length, count) in enumerate(length_params):
        if style == "memit":
            prompts = [TEMPLATE_SEED_PROMPTS[i % len(TEMPLATE_SEED_PROMPTS)] for i in range(count)]
        else:
            prompts = [_document_start_text(tok)] * count
        texts = _sample_prefixes(model, tok, prompts, length, seed + k)  # lengths sampled apart
        if style == "memit":
            texts = [t.replace("{", " ").replace("}", " ") for t in texts]
        else:  # a brace would break str.format; ROME's GPT-2 samples never held one
            texts = [t.replace("{", "(").replace("}", ")") for t in texts]
        groups.append([t + ". {}" for t in texts])
    LOG.info("%s context templates: %s", style, groups)
    return groups


@dataclass
class EditContext:
    """What an editing run computes once and reuses: templates, statistics, folders."""

    model_name: str
    stats_dir: Optional[Path] = None
    data_dir: Optional[Path] = None
    seed: int = 0
    _templates: Dict[Tuple, List[List[str]]] = field(default_factory=dict)
    _second_moments: Dict[Path, torch.Tensor] = field(default_factory=dict)
    _derived: Dict[Hashable, Any] = field(default_factory=dict)

    def derived(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """What a method derives from the statistics (AlphaEdit's projectors), computed or read once per run.
        ``key`` must name every setting the value depends on, as a cache file's path does."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def context_templates(self, model, tok, length_params, style: str = "memit") -> List[List[str]]:
        key = (style,) + tuple(tuple(p) for p in length_params)
        if key not in self._templates:
            self._templates[key] = generate_context_templates(model, tok, length_params, seed=self.seed, style=style)
        return self._templates[key]

    def second_moments(self, model, tok, hparams, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
        """``{layer: C0}`` for the rewrite module of each layer, from memory, disk, or one new pass."""
        from editing.layer_stats import load_or_compute_second_moments, stats_file
        from util.paths import get_paths

        # The cache file's path names every setting the statistics depend on.
        key = lambda layer: stats_file(Path(self.stats_dir or get_paths().stats_dir), self.model_name, hparams, layer)
        missing = [layer for layer in layers if key(layer) not in self._second_moments]
        if missing:
            computed = load_or_compute_second_moments(
                model, tok, hparams, missing, self.model_name, stats_dir=self.stats_dir, data_dir=self.data_dir
            )
            for layer, value in computed.items():
                self._second_moments[key(layer)] = value
        return {layer: self._second_moments[key(layer)] for layer in layers}
