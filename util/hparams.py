"""Hyperparameters: one dataclass per method, loaded from JSON with validation that names the bad key."""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from pathlib import Path
from typing import Any, ClassVar, Optional, Tuple

from util.errors import ECEError

LOG = logging.getLogger(__name__)


class HParamsError(ECEError, ValueError):
    """A hyperparameter file that cannot be used; the message names the file and the key."""


def _type_ok(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin is typing.Union or str(origin) == "types.UnionType":
        return any(_type_ok(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin in (list, typing.List):
        (item,) = typing.get_args(expected) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin in (dict, typing.Dict):
        return isinstance(value, dict)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


@dataclasses.dataclass
class HyperParams:
    """Base class. Subclasses declare fields; ``from_json`` checks names and types.

    ``COMPATIBILITY_KEYS``: fields accepted so that the published files load unchanged, but read by no
    code here; a file that sets one gets a warning naming it.
    """

    COMPATIBILITY_KEYS: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, values: dict, source: str = "<dict>"):
        if not isinstance(values, dict):
            raise HParamsError(f"{source}: expected a JSON object of hyperparameters, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise HParamsError(
                f"{source}: unknown key(s) {unknown} for {cls.__name__}; "
                f"valid keys are {sorted(fields)}. Fix the spelling or remove the key."
            )
        missing = [
            name
            for name, f in fields.items()
            if name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        if missing:
            raise HParamsError(f"{source}: missing required key(s) {missing} for {cls.__name__}. Add them to the file.")
        for name, value in values.items():
            if not _type_ok(value, hints[name]):
                raise HParamsError(
                    f"{source}: key '{name}' must be {_type_name(hints[name])}, got {value!r} "
                    f"({type(value).__name__})."
                )
        obj = cls(**values)
        obj.validate(source)
        for name in sorted(set(values) & set(cls.COMPATIBILITY_KEYS)):
            LOG.warning("%s: key '%s' is ignored by %s (accepted only so that the published files load)",
                        source, name, cls.__name__)
        return obj

    @classmethod
    def from_json(cls, path: str | Path, overrides: Optional[dict] = None):
        """The file's values, with ``overrides`` (``{key: value}``, e.g. from ``--hparams``) on top."""
        values = read_hparams_file(path)
        if not overrides:
            return cls.from_dict(values, source=str(path))
        return cls.from_dict({**values, **overrides}, source=f"{path} with overrides {overrides}")

    def validate(self, source: str) -> None:
        """Checks across keys; subclasses extend it and raise HParamsError naming the key."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        """The fields that have a default, with it: what a run made before such a field existed ran with."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        return values


def read_hparams_file(path: str | Path) -> dict:
    """The JSON object of a hyperparameter file; :class:`HParamsError` when it is missing or not JSON."""
    path = Path(path)
    if not path.exists():
        raise HParamsError(f"hyperparameter file {path} does not exist")
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise HParamsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(values, dict):
        raise HParamsError(f"{path}: expected a JSON object of hyperparameters, got {type(values).__name__}")
    return values


def parse_overrides(pairs) -> dict:
    """``["key=value", ...]`` -> ``{key: value}``; a value is JSON (``false``, ``10``, ``[3, 4]``) or else a string."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HParamsError(f"bad hyperparameter override {pair!r}: write key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def require(condition: bool, source: str, key: str, message: str) -> None:
    if not condition:
        raise HParamsError(f"{source}: key '{key}' {message}")
