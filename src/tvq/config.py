"""The paper's JSON configs, accepted exactly as its README shows them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tvq.errors import ConfigError, where


class PaperQuantizeConfig(BaseModel):
    """``quantize_config.json`` of AIM-SKKU/TVQ (``finetuned_model`` is accepted for ``finetuned``)."""

    model_config = ConfigDict(extra="forbid")

    quantize_target: Literal["task_vector", "finetuned"] = "task_vector"
    quantize_residual: bool = False
    quantize_task_bit: int = 4
    quantize_base_bit: int | None = None
    q_error_correction: bool = False

    @field_validator("quantize_target", mode="before")
    @classmethod
    def _alias(cls, value: object) -> object:
        return "finetuned" if value == "finetuned_model" else value


class PaperLoadConfig(BaseModel):
    """``load_config.json`` of AIM-SKKU/TVQ: which kind of task vectors to merge from."""

    model_config = ConfigDict(extra="forbid")

    load_tv_type: Literal["baseline", "quantized_finetuned", "quantized_task_vector", "quantized_residual_task_vector"]
    load_task_bits: int | None = None
    load_base_bits: int | None = None


def read_config_file(path: str | Path) -> dict:
    """Parse JSON or YAML into a dict, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where(p)}: config file not found")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
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
        first = exc.errors()[0]
        loc = ".".join(map(str, first["loc"]))
        raise ConfigError(f"{where(path)}: invalid value for '{loc}': {first['msg']}") from None


def load_quantize_config(path: str | Path) -> PaperQuantizeConfig:
    return validate_config(PaperQuantizeConfig, read_config_file(path), path)  # type: ignore[return-value]
