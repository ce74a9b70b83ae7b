"""The paper's JSON configs, accepted exactly as its README shows them, and strictly: JSON
``true`` is not ``bits = 1``, ``"yes"`` is not ``residual = true``. JSON has one number type,
so an exactly integral number (``4.0``) is the integer it equals; ``4.5`` is not an integer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from tvq.errors import ConfigError, where
from tvq.quant.bits import MAX_BITS, MIN_BITS


def integral(value: object) -> object:
    """``4.0`` -> ``4`` (JSON and YAML write integers as floats too); anything else unchanged,
    for the strict int check (which refuses ``4.5``, ``"4"`` and ``true``)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(integral)]
Bits = Annotated[Integer, Field(ge=MIN_BITS, le=MAX_BITS)]
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e-3`` is a number (YAML 1.2, JSON), not the
    string it is in YAML 1.1: strict fields would otherwise refuse an innocent ``lambda: 1e-3``."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with exponent floats (``1e-3``) read as numbers."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose key appears twice is an error, not "the last one wins"."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key '{k}' appears twice")
        out[k] = v
    return out


class PaperQuantizeConfig(BaseModel):
    """``quantize_config.json`` of AIM-SKKU/TVQ (``finetuned_model`` is accepted for ``finetuned``)."""

    model_config = STRICT

    quantize_target: Literal["task_vector", "finetuned"] = "task_vector"
    quantize_residual: bool = False
    quantize_task_bit: Bits = 4
    quantize_base_bit: Bits | None = None
    q_error_correction: bool = False

    @field_validator("quantize_target", mode="before")
    @classmethod
    def _alias(cls, value: object) -> object:
        return "finetuned" if value == "finetuned_model" else value


class PaperLoadConfig(BaseModel):
    """``load_config.json`` of AIM-SKKU/TVQ: which kind of task vectors to merge from."""

    model_config = STRICT

    load_tv_type: Literal["baseline", "quantized_finetuned", "quantized_task_vector", "quantized_residual_task_vector"]
    load_task_bits: Bits | None = None
    load_base_bits: Bits | None = None


def read_config_file(path: str | Path) -> dict:
    """Parse JSON or YAML into a dict, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where(p)}: config file not found")
    text = p.read_text()
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if p.suffix == ".json" else load_yaml(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where(p)}: cannot parse ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where(p)}: expected a mapping of options")
    return data


def validate_config(model: type[BaseModel], data: dict, path: str | Path) -> BaseModel:
    """Validate ``data`` against ``model``; unknown keys are named with the valid ones."""
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise ConfigError(
            f"{where(path)}: unknown config key '{unknown[0]}' (valid keys: {', '.join(model.model_fields)})"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where(path)}: {validation_problem(exc)}") from None


def validation_problem(exc: ValidationError, shown: dict[str, str] | None = None, nested: bool = False) -> str:
    """pydantic's first error as "invalid value for 'key': why (got VALUE)", one line; ``shown``
    maps field names to the names users type (aliases); ``nested`` names the whole path
    (``files.<name>.tensors.<key>.bits``) instead of the top-level key."""
    errors = exc.errors()
    first = errors[0]
    if first["type"].endswith("_type"):  # a union (``0.2`` or ``{task: 0.2}``): the branch the value took, not "wrong type"
        same = [e for e in errors if e["loc"][:1] == first["loc"][:1] and not e["type"].endswith("_type")]
        first = same[0] if same else first
    loc = [str(p)[:80] for p in first["loc"]]
    parts = loc if nested else loc[:1]
    key = ".".join([(shown or {}).get(parts[0], parts[0]), *parts[1:]]) if parts else "options"
    got = first.get("input")
    text = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"invalid value for '{key}': {first['msg']} (got {text})"


def load_quantize_config(path: str | Path) -> PaperQuantizeConfig:
    return validate_config(PaperQuantizeConfig, read_config_file(path), path)  # type: ignore[return-value]
