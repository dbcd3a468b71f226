"""Edit requests: the shapes a user may write them in, and the checks that stop a bad one with one clear line.

A request that cannot be edited otherwise fails deep inside the target loop with a traceback (a prompt
without ``{}``), or edits nothing useful without a word (an empty target, a target equal to the true one).
Every request is checked before anything is loaded, edited or written, and the error names the request
(its number and subject) and the fix.

Accepted shapes, one object per fact:

- simple: ``{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
  "target_true": "Paris"}`` (``target_true``, ``case_id`` and ``relation_id`` optional);
- MEMIT's: the same with ``{"str": ...}`` targets, or a whole CounterFact record with ``requested_rewrite``.

A prompt may hold the subject's text instead of ``{}`` (EasyEdit's shape); its first occurrence becomes the
placeholder. Every algorithm reads MEMIT's shape, which is what the checks return:
``{"case_id", "prompt", "subject", "target_new": {"str"}[, "target_true": {"str"}]}``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from dsets.counterfact import check_template
from util.errors import RequestError

# The prompt of a fact is one sentence; a longer one makes every target-loop step slower and is rarely
# meant. With its target and the longest context prefix it must also fit the model's positions.
MAX_PROMPT_TOKENS = 256
REQUEST_KEYS = ("case_id", "prompt", "subject", "target_new", "target_true", "relation_id")
EXAMPLE = '{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}'


def request_name(index, subject=None, label: str = "request") -> str:
    """``request 2 (subject 'Miles Davis')``: how every message names a request."""
    if isinstance(subject, str) and subject.strip():
        return f"{label} {index} (subject {subject!r})"
    return f"{label} {index}"


def _target_text(value, key: str, name: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, dict):
        if not isinstance(value.get("str"), str):
            raise RequestError(f"{name}: {key} {value!r} has no text under 'str'; write \"{key}\": \"Rome\" "
                               f"or \"{key}\": {{\"str\": \"Rome\"}}")
        value = value["str"]
    if not isinstance(value, str):
        raise RequestError(f"{name}: {key} must be a string, got {value!r}; write \"{key}\": \"Rome\"")
    return value


def _template(prompt, subject: str, name: str, from_dataset: bool) -> str:
    """The prompt with exactly one ``{}`` where the subject goes."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"{name}: no prompt; give the start of a sentence with '{{}}' where the subject goes, "
                           "e.g. \"prompt\": \"{} is located in the city of\"")
    count = prompt.count("{}")
    if count > 1:
        raise RequestError(f"{name}: prompt {prompt!r} contains '{{}}' {count} times; write it once, where the "
                           "subject goes")
    if count == 0:
        if subject not in prompt:
            raise RequestError(f"{name}: prompt {prompt!r} has no '{{}}' and does not contain the subject; write "
                               "'{}' where the subject goes, e.g. \"{} is located in the city of\"")
        if from_dataset:
            raise RequestError(f"{name}: prompt {prompt!r} has no '{{}}' placeholder for the subject; the "
                               "dataset record must have '{}' where the subject goes")
        prompt = prompt.replace(subject, "{}", 1)
    problem = check_template(prompt, subject)  # the dataset loaders' check, with the fix for this caller
    if problem:
        raise RequestError(f"{name}: {problem}; remove them")
    if not from_dataset and prompt != prompt.rstrip():
        raise RequestError(f"{name}: prompt {prompt!r} ends with whitespace; remove it (the target is read with "
                           "its own leading space)")
    return prompt


def check_request(raw, index, label: str = "request", from_dataset: bool = False) -> dict:
    """One request in MEMIT's shape, or :class:`RequestError` naming it (``label index (subject ...)``).

    ``from_dataset``: a record of a benchmark dataset, checked only for what would break the edit (its
    placeholder, subject and targets): zsRE's records may carry a new target equal to the true one.
    """
    name = request_name(index, None, label)
    if not isinstance(raw, dict):
        raise RequestError(f"{name}: a {type(raw).__name__}, not an object; write each request as {EXAMPLE}")
    rewrite = raw.get("requested_rewrite", raw)  # a whole CounterFact record
    if not isinstance(rewrite, dict):
        raise RequestError(f"{name}: requested_rewrite must be an object like {EXAMPLE}")
    case_id = raw.get("case_id", rewrite.get("case_id", index))
    subject = rewrite.get("subject")
    name = request_name(index, subject, label)
    if rewrite is raw and not from_dataset:
        unknown = sorted(set(raw) - set(REQUEST_KEYS))
        if unknown:
            raise RequestError(f"{name}: unknown key(s) {unknown}; a request has prompt, subject, target_new and "
                               "optionally target_true, case_id and relation_id")
    if not isinstance(subject, str) or not subject.strip():
        raise RequestError(f"{name}: no subject; give the entity whose fact changes, e.g. "
                           "\"subject\": \"The Eiffel Tower\"")
    prompt = _template(rewrite.get("prompt"), subject, name, from_dataset)
    target_new = _target_text(rewrite.get("target_new"), "target_new", name)
    target_true = _target_text(rewrite.get("target_true"), "target_true", name)
    if target_new is None or not target_new.strip():
        raise RequestError(f"{name}: target_new is {'missing' if target_new is None else 'empty'}; give the new "
                           "object, e.g. \"target_new\": \"Rome\"")
    if target_true is not None and not target_true.strip():
        raise RequestError(f"{name}: target_true is empty; give the object the model knows now, or leave the key out")
    if not from_dataset and target_true is not None and target_new.strip() == target_true.strip():
        raise RequestError(f"{name}: target_new and target_true are both {target_new.strip()!r}, so there is "
                           "nothing to change; give a different target_new")
    if from_dataset:  # records keep their own fields (relation_id, target ids) as the driver always passed them
        return {"case_id": case_id, **rewrite}
    request = {"case_id": case_id, "prompt": prompt, "subject": subject, "target_new": {"str": target_new}}
    if target_true is not None:
        request["target_true"] = {"str": target_true}
    if rewrite.get("relation_id") is not None:  # what ECE's cluster_by "relation" groups by
        request["relation_id"] = str(rewrite["relation_id"])
    return request


def model_position_limit(model) -> Optional[int]:
    """The longest sequence the model's positions allow, when its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(requests: Sequence[dict], tok, position_limit: Optional[int], reserve: int = 0) -> None:
    """:class:`RequestError` for the first request whose prompt, target and ``reserve`` tokens (the longest
    context prefix the method puts in front) exceed ``MAX_PROMPT_TOKENS`` or the model's positions."""
    from util.tokens import prompt_ids, target_ids

    limit = MAX_PROMPT_TOKENS if position_limit is None else min(MAX_PROMPT_TOKENS, position_limit)
    for index, request in enumerate(requests):
        prompt_tokens = len(prompt_ids(tok, request["prompt"].format(request["subject"])))
        target_tokens = max(len(target_ids(tok, request[key]["str"]))
                            for key in ("target_new", "target_true") if key in request)
        total = prompt_tokens + target_tokens + reserve
        if total > limit:
            why = (f"the model's {position_limit} positions" if position_limit is not None and
                   position_limit < MAX_PROMPT_TOKENS else f"the limit of {MAX_PROMPT_TOKENS} for one fact")
            raise RequestError(
                f"{request_name(index, request['subject'])}: prompt and target are {prompt_tokens + target_tokens} "
                f"tokens, {reserve} more with the context prefix, over {why}; shorten the prompt to the sentence "
                "that leads to the target")


def check_requests(raw_requests, label: str = "request") -> List[dict]:
    """Every request checked and in MEMIT's shape; the first bad one raises, saying how many more are bad."""
    if isinstance(raw_requests, dict):
        raw_requests = [raw_requests]
    if not isinstance(raw_requests, (list, tuple)) or not raw_requests:
        raise RequestError(f"no requests to edit; give a list of requests like [{EXAMPLE}]")
    checked, errors = [], []
    for index, raw in enumerate(raw_requests):
        try:
            checked.append(check_request(raw, index, label))
        except RequestError as e:
            errors.append(str(e))
    if errors:
        more = f" ({len(errors) - 1} more request(s) have problems)" if len(errors) > 1 else ""
        raise RequestError(errors[0] + more)
    return checked


def read_requests_file(path) -> list:
    """The raw requests of a JSON file (a list, or one object) or a JSONL file (one object per line)."""
    import json
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.is_file():
        raise RequestError(f"requests file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RequestError(f"{path}: line {number} is not JSON ({e.msg}); write a JSON list of requests "
                                       f"or one request per line, each like {EXAMPLE}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise RequestError(f"{path}: no requests; write a JSON list of requests or one per line, each like {EXAMPLE}")
    return data
