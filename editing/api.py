"""Editing facts of your own from Python: one entry point for every registered algorithm.

    from editing.api import load, edit
    model, tok = load("smollm2-135m")
    result = edit(model, tok, [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                                "target_new": "Rome"}], alg="ECE_WI")
    result.summary()   # per request: steps, loss, probability of the new target before and after
    result.restore()   # the weights as they were before this call

``edit`` changes the model in place. Consecutive calls on one model with the same method and hparams share
one :class:`Editor` (kept on the model), so edits accumulate as in a sequential run: the methods that keep
``C_prev`` (MEMIT_seq, AlphaEdit, ECE) see the keys of the earlier calls, and the context templates and
statistics are computed once. Use :class:`Editor` directly to hold that state yourself.

Hparams: a file (a name in ``hparams/<ALG folder>/`` or a path), a dict, or None for the shipped file of the
model (``hparams/<folder>/<model>.json``), plus ``overrides``. The model's name comes from :func:`load`
(``model.name_or_path``) or ``model_name=``; a folder written by ``experiments/edit.py --save_dir`` stands for
its base model (its ``edit_manifest.json`` says which), so its hparams and statistics are the base model's.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from editing.context import EditContext
from editing.requests import check_lengths, check_requests, model_position_limit
from editing.round import EditReport
from editing.sequential import SequentialState
from util.errors import RequestError, SettingError
from util.hparams import HParamsError, HyperParams
from util.weights import load_weights, snapshot_weights

LOG = logging.getLogger(__name__)

MANIFEST_FILE = "edit_manifest.json"
DEFAULT_ALGORITHM = "ECE_WI"


def load(model_name: str = "smollm2-135m", device: Optional[str] = None, dtype: Optional[str] = None):
    """``(model, tokenizer)``: an embedded name, a hub id or a local folder (one written by
    ``experiments/edit.py --save_dir`` included), in eval mode with gradients off."""
    from util.models import load_model_and_tokenizer

    return load_model_and_tokenizer(model_name, device, dtype)


def read_manifest(model_name: Optional[str]) -> Optional[dict]:
    """The edit manifest of a folder written by ``save_edited_model``, or None for any other model."""
    if not model_name:
        return None
    path = Path(model_name).expanduser() / MANIFEST_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def base_model_name(model_name: Optional[str]) -> Optional[str]:
    """The unedited model a name stands for: an edited folder's base model, else the name itself."""
    manifest = read_manifest(model_name)
    return manifest["base_model"] if manifest else model_name


def default_hparams_path(algorithm, model_name: Optional[str]) -> Path:
    """The shipped ``hparams/<folder>/<model>.json`` of an algorithm and model."""
    from util.paths import get_paths

    folder = get_paths().hparams_dir / algorithm.hparams_dir_name
    if model_name:
        path = folder / f"{Path(model_name.rstrip('/')).name}.json"
        if path.is_file():
            return path
    available = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    raise HParamsError(
        f"no shipped {algorithm.name} hyperparameters for model {model_name!r} in {folder} (files for: "
        f"{', '.join(available) or 'none'}); give a hyperparameter file (--hparams_fname, or hparams= a file or "
        "a dict in Python) or the name of one of those models (model_name=)")


def resolve_hparams(algorithm, hparams=None, overrides: Optional[dict] = None,
                    model_name: Optional[str] = None) -> tuple:
    """``(hparams object, source)``: from a file, a dict, a hparams object, or the model's shipped file."""
    from experiments.driver import resolve_hparams_path

    overrides = dict(overrides or {})
    if isinstance(hparams, HyperParams):
        source = f"<{type(hparams).__name__}>"
        if not overrides and isinstance(hparams, algorithm.hparams_class):
            return hparams, source
        unset = {k for k, v in hparams.to_dict().items() if v is None and k in hparams.COMPATIBILITY_KEYS}
        values = {k: v for k, v in hparams.to_dict().items() if k not in unset}
        return algorithm.hparams_class.from_dict({**values, **overrides}, source=source), source
    if isinstance(hparams, dict):
        source = "<dict>" if not overrides else f"<dict> with overrides {overrides}"
        return algorithm.hparams_class.from_dict({**hparams, **overrides}, source=source), "<dict>"
    if hparams is None:
        path = default_hparams_path(algorithm, model_name)
    elif isinstance(hparams, (str, Path)):
        path = resolve_hparams_path(algorithm, str(hparams))
    else:
        raise HParamsError(f"hparams must be a file name, a path, a dict or None, got {type(hparams).__name__}")
    return algorithm.hparams_class.from_json(path, overrides or None), str(path)


def _template_reserve(hparams) -> int:
    """Tokens a context prefix adds in front of a prompt (its sampled length and the '. ' joint)."""
    lengths = [length for length, _ in getattr(hparams, "context_template_length_params", [])]
    return max(lengths) + 2 if lengths else 0


@dataclass
class TargetProbabilities:
    """What the model gives a request's targets after its prompt: joint probabilities of every token."""

    new: float
    true: Optional[float]
    top_token: str  # the most probable next token
    top_probability: float


@torch.no_grad()
def target_probabilities(model, tok, requests: Sequence[dict], batch_size: int = 32) -> List[TargetProbabilities]:
    """For each request in MEMIT's shape: p(target_new), p(target_true) (None without one) and the most
    probable next token after the filled prompt."""
    from util.models import model_device
    from util.scoring import continuation_scores, left_padded_logits
    from util.tokens import chunks, prompt_ids

    prompts = [r["prompt"].format(r["subject"]) for r in requests]
    pairs = [(i, key) for i, r in enumerate(requests) for key in ("target_new", "target_true") if key in r]
    scores = continuation_scores(model, tok, [prompts[i] for i, _ in pairs],
                                 [requests[i][key]["str"] for i, key in pairs], batch_size)
    probability = {pair: float(torch.tensor(-sum(s.token_nlls)).exp()) for pair, s in zip(pairs, scores)}
    device = model_device(model)
    top = []
    for batch in chunks(prompts, batch_size):
        logits = left_padded_logits(model, tok, [prompt_ids(tok, p) for p in batch], 1, device)[:, -1]
        p, token = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        top += [(tok.decode([int(t)]), float(q)) for t, q in zip(token, p)]
    return [TargetProbabilities(probability[(i, "target_new")], probability.get((i, "target_true")), *top[i])
            for i in range(len(requests))]


@dataclass
class RequestResult:
    """One request of an edit: how the target loop went and what the model says before and after."""

    request: dict
    steps: Optional[int] = None  # target-value optimisation steps (FT: epochs, shared by the requests)
    loss: Optional[float] = None  # the target loop's last loss, where the method reports it (ECE)
    before: Optional[TargetProbabilities] = None
    after: Optional[TargetProbabilities] = None

    @property
    def subject(self) -> str:
        return self.request["subject"]

    def to_dict(self) -> dict:
        out = {"case_id": self.request.get("case_id"), "subject": self.subject, "prompt": self.request["prompt"],
               "target_new": self.request["target_new"]["str"],
               "target_true": self.request.get("target_true", {}).get("str"), "steps": self.steps, "loss": self.loss}
        for stage in ("before", "after"):
            value = getattr(self, stage)
            out[stage] = None if value is None else {"p_new": value.new, "p_true": value.true,
                                                     "top_token": value.top_token, "p_top": value.top_probability}
        return out


@dataclass
class EditResult:
    """What one ``edit`` call did; ``restore()`` puts back the weights (and sequential state) from before it."""

    algorithm: str
    hparams: HyperParams
    requests: List[RequestResult]
    report: EditReport
    seconds: float
    _editor: "Editor" = field(repr=False)
    _weights_before: Dict[str, torch.Tensor] = field(repr=False)
    _state_before: Optional[dict] = field(repr=False, default=None)

    @property
    def model(self):
        return self._editor.model

    @property
    def explanation(self) -> Optional[dict]:
        """ECE's account of the edit (neurons, clusters, per request), None for the other methods."""
        return self.report.explanation

    def restore(self) -> None:
        """The edited modules' weights as they were before this call, and the sequential state too (restore
        later edits first: this also undoes any later edit of the same modules)."""
        self._editor.restore_to(self._weights_before, self._state_before)

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "seconds": self.seconds,
                "requests": [r.to_dict() for r in self.requests], "report": self.report.to_dict()}

    def summary(self) -> str:
        """One line per request: the new target's probability before and after, steps and loss."""
        lines = []
        for i, r in enumerate(self.requests):
            line = f"[{i}] {r.request['prompt'].format(r.subject)} -> {r.request['target_new']['str']!r}"
            if r.before is not None and r.after is not None:
                line += f": p(new) {r.before.new:.4f} -> {r.after.new:.4f}"
                if r.before.true is not None:
                    line += (f", p(true {r.request['target_true']['str']!r}) {r.before.true:.4f} -> "
                             f"{r.after.true:.4f}")
                line += f", top {r.before.top_token!r} -> {r.after.top_token!r}"
            if r.steps is not None:
                line += f"; {r.steps} steps"
            if r.loss is not None:
                line += f", loss {r.loss:.4f}"
            lines.append(line)
        return "\n".join(lines)


class Editor:
    """A model, its tokenizer, one algorithm with its hparams, and what successive edits share: the
    sequential state (``C_prev`` for the methods that keep it), the context templates and statistics."""

    def __init__(self, model, tok, alg: str = DEFAULT_ALGORITHM, hparams=None, overrides: Optional[dict] = None,
                 model_name: Optional[str] = None, seed: int = 0, stats_dir=None, data_dir=None):
        from experiments.algorithms import get_algorithm  # the registry imports every method, this module too

        self.model, self.tok, self.seed = model, tok, seed
        self.algorithm = get_algorithm(alg)
        self.model_name = model_name or getattr(model, "name_or_path", None) or None
        self.base_model = base_model_name(self.model_name)
        self.hparams, self.hparams_source = resolve_hparams(self.algorithm, hparams, overrides, self.base_model)
        self.overrides = dict(overrides or {})
        if not self.base_model:
            raise HParamsError("the model has no name to look up its statistics; pass model_name= (e.g. the "
                               "name of its hparams file)")
        # Statistics and their cache files belong to the unedited model.
        self.context = EditContext(self.base_model, stats_dir=stats_dir, data_dir=data_dir, seed=seed)
        self.state: Optional[SequentialState] = None
        if self.algorithm.uses_sequential_state:
            self.state = SequentialState(track_prev_moments=self.algorithm.keeps_prev_moments)
        self.modules = [self.hparams.rewrite_module_tmp.format(layer) for layer in self.hparams.layers]
        self.rounds = 0
        self.original_weights: Optional[Dict[str, torch.Tensor]] = None
        # The editing code computes its own gradients; the model's parameters must not collect any.
        model.eval()
        model.requires_grad_(False)

    def check(self, requests) -> List[dict]:
        """The requests in MEMIT's shape, or :class:`RequestError` naming the first bad one."""
        checked = check_requests(requests)
        if self.algorithm.name == "ECE_GA":
            missing = [i for i, r in enumerate(checked) if "target_true" not in r]
            if missing:
                raise RequestError(f"request {missing[0]} (subject {checked[missing[0]]['subject']!r}): ECE_GA "
                                   "scores neurons by the gradient of the true target; give target_true")
        check_lengths(checked, self.tok, model_position_limit(self.model), _template_reserve(self.hparams))
        return checked

    def edit(self, requests, score: bool = True, last: bool = False) -> EditResult:
        """Edit ``requests`` into the model (one round). ``score``: the targets' probabilities before and
        after. ``last``: no more edits follow, so the method's final step runs too (:meth:`finish`). A
        failure leaves the weights and the state as they were."""
        from experiments.driver import set_seed

        checked = self.check(requests)
        weights_before = snapshot_weights(self.model, self.modules)
        if self.original_weights is None:
            self.original_weights = weights_before
        # The state's tensors are replaced, never changed in place, so a shallow copy keeps the old values.
        state_before = self.state.state_dict() if self.state is not None else None
        state_before = SequentialState.from_state_dict(state_before).state_dict() if state_before else None
        before = target_probabilities(self.model, self.tok, checked) if score else None
        set_seed(self.seed + self.rounds)
        start = time.perf_counter()
        try:
            report = self.algorithm.apply(self.model, self.tok, checked, self.hparams, self.context, self.state)
            finished = self.finish() if last else {}
            if finished:
                report.extra["finish"] = finished
        except BaseException:
            self.restore_to(weights_before, state_before)
            raise
        seconds = time.perf_counter() - start
        self.rounds += 1
        after = target_probabilities(self.model, self.tok, checked) if score else None
        results = [RequestResult(r, *self._steps_and_loss(report, i, len(checked)),
                                 before=before[i] if before else None, after=after[i] if after else None)
                   for i, r in enumerate(checked)]
        LOG.info("%s: %d request(s) edited in %.1fs", self.algorithm.name, len(checked), seconds)
        return EditResult(self.algorithm.name, self.hparams, results, report, seconds, self, weights_before,
                          state_before)

    def finish(self) -> dict:
        """The method's step after the last edit (PRUNE with ``prune_schedule: after_last_round``)."""
        if self.algorithm.finish is None or self.state is None or self.state.finished:
            return {}
        done = self.algorithm.finish(self.model, self.hparams, self.state)
        self.state.finished = True
        return done

    def restore(self) -> None:
        """The weights from before this editor's first edit, and a fresh sequential state."""
        if self.original_weights is not None:
            load_weights(self.model, self.original_weights)
        if self.state is not None:
            self.state = SequentialState(track_prev_moments=self.algorithm.keeps_prev_moments)

    def restore_to(self, weights: Dict[str, torch.Tensor], state: Optional[dict]) -> None:
        load_weights(self.model, weights)
        if state is not None:
            self.state = SequentialState.from_state_dict(state)

    @staticmethod
    def _steps_and_loss(report: EditReport, index: int, count: int) -> tuple:
        explained = (report.explanation or {}).get("requests")
        if explained and len(explained) == count:
            return explained[index]["target_steps"], explained[index]["target_loss"]
        if len(report.target_steps) == count:
            return report.target_steps[index], None
        if "ft_steps" in report.extra:  # FT: epochs over all requests together
            return report.extra["ft_steps"], None
        return None, None


def check_save_dir(save_dir) -> Path:
    """The folder ``save_edited_model`` may write: new, empty, or an earlier edited model (replaced whole).
    Checked before any editing, so a run that could not save never starts."""
    save_dir = Path(save_dir).expanduser()
    if save_dir.exists():
        if not save_dir.is_dir():
            raise SettingError(f"cannot save the edited model in {save_dir}: it is a file; give a folder")
        if any(save_dir.iterdir()) and not (save_dir / MANIFEST_FILE).is_file():
            raise SettingError(f"cannot save the edited model in {save_dir}: the folder exists and holds no edited "
                               f"model ({MANIFEST_FILE}); give a new folder or empty it")
    return save_dir


def edit_manifest(editor: Editor, results: Sequence[EditResult]) -> dict:
    """What a saved edited model carries about its edits: enough to know and redo them."""
    import datetime
    import platform

    import transformers

    return {
        "base_model": editor.base_model,
        "edited_from": editor.model_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "algorithm": editor.algorithm.name,
        "hparams_source": editor.hparams_source,
        "hparams_overrides": editor.overrides,
        "hparams": editor.hparams.to_dict(),
        "seed": editor.seed,
        "edited_modules": editor.modules,
        "edits": [result.to_dict() for result in results],
        # C_prev can be large (d_in x d_in per layer); it is not saved, so further edits of this folder
        # start a new sequential state.
        "sequential_state_saved": False,
        "previous_manifest": read_manifest(editor.model_name),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def save_edited_model(save_dir, editor: Editor, results: Sequence[EditResult]) -> Path:
    """The edited model (safetensors), its tokenizer and ``edit_manifest.json`` in ``save_dir``.

    Written into a temporary folder beside it and renamed into place, so a failure leaves no half folder;
    an earlier edited model in ``save_dir`` is replaced only once the new one is complete."""
    import os
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from util.io import atomic_write_json, current_umask

    save_dir = check_save_dir(save_dir)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.", suffix=".tmp", dir=save_dir.parent))
    old = None
    try:
        editor.model.save_pretrained(tmp)
        editor.tok.save_pretrained(tmp)
        probe = "The Eiffel Tower is located in the city of"
        if AutoTokenizer.from_pretrained(tmp)(probe)["input_ids"] != editor.tok(probe)["input_ids"]:
            raise RuntimeError("the saved tokenizer encodes text differently from the one in memory")
        atomic_write_json(tmp / MANIFEST_FILE, edit_manifest(editor, results), indent=2)
        # Temporary folders and files are private (0700/0600); the saved model is readable like any other.
        mask = current_umask()
        os.chmod(tmp, 0o777 & ~mask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)
        if save_dir.exists() and any(save_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.", suffix=".old", dir=save_dir.parent))
            os.replace(save_dir, old)
        os.replace(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not save_dir.exists():
            os.replace(old, save_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    LOG.info("edited model saved in %s", save_dir)
    return save_dir


def editor_for(model, tok, alg: str = DEFAULT_ALGORITHM, hparams=None, overrides: Optional[dict] = None,
               model_name: Optional[str] = None, seed: int = 0, **kwargs) -> Editor:
    """The editor this model already has for this method and these hparams, else a new one kept on it."""
    editor = Editor(model, tok, alg, hparams, overrides, model_name=model_name, seed=seed, **kwargs)
    key = (editor.algorithm.name, json.dumps(editor.hparams.to_dict(), sort_keys=True), editor.base_model, seed)
    editors = model.__dict__.setdefault("_ece_editors", {})
    if key not in editors or editors[key].tok is not tok:
        editors[key] = editor
    return editors[key]


def edit(model, tok, requests, alg: str = DEFAULT_ALGORITHM, hparams: Union[str, Path, dict, None] = None,
         overrides: Optional[dict] = None, model_name: Optional[str] = None, seed: int = 0,
         score: bool = True, **kwargs) -> EditResult:
    """Edit ``requests`` into ``model`` in place with ``alg``; see the module docstring."""
    editor = editor_for(model, tok, alg, hparams, overrides, model_name=model_name, seed=seed, **kwargs)
    return editor.edit(requests, score=score)
