"""``tvq merge --config FILE``: tvq's own merge config, or mergekit's YAML, or either with a
``quantize:`` step first (a whole quantize + merge pipeline in one file).

tvq's own schema (YAML or JSON; what a merged folder's ``tvq_recipe.yml`` holds)::

    method: ties                    # a tvq method or alias
    options: {density: 0.2, lambda: 0.3}   # or flat, beside ``method``
    pretrained: base/               # the inputs, all optional (flags override)
    packs: [packs/tvq4]
    finetuned: {extra: ft/extra}
    tasks: [sst2, mnli, extra]      # which tasks, in which order (default: all)
    task: sst2                      # EMR: this task's model (default: the unified pack)
    unified: emr.safetensors        # EMR: read task's model from this unified pack (no packs, no options)
    dtype: same
    norm_stats: mean
    quantize: {pretrained: base/, finetuned: {sst2: ft/sst2}, bits: 4, out: packs/tvq4}

Every key is optional, so the schema grows compatibly: ``task`` and ``unified`` came later (the
recipe of one task's model from a unified EMR pack), and recipes written before them load as
they did. (A tvq older than a key reads it as a method option, and refuses it in one line.)

mergekit's schema is recognised by ``merge_method`` (``tvq.merge.mergekit_config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from tvq.config import STRICT, read_config_file, validation_problem
from tvq.encode.options import QuantizeOptions
from tvq.encode.pipeline import QuantizeReport, quantize
from tvq.errors import ConfigError, where
from tvq.execute import Executor
from tvq.io.hub import hub_reference
from tvq.merge.mergekit_config import is_mergekit, read_mergekit
from tvq.merge.plan import MergePlan, QuantizeStep
from tvq.quant.selection import KeyRule

RECIPE_FILE = "tvq_recipe.yml"
MERGEKIT_FILE = "mergekit_config.yml"


class TvqInputs(BaseModel):
    """The keys of tvq's own schema besides the method and its options."""

    model_config = STRICT

    pretrained: str | None = None
    packs: list[str] = []
    finetuned: dict[str, str] = {}
    tasks: list[str] | None = None
    task: str | None = None
    unified: str | None = None
    dtype: Literal["same", "float32", "float16", "bfloat16"] | None = None
    norm_stats: str | None = None
    quantize: QuantizeStep | None = None


def read_recipe(path: Path) -> MergePlan:
    """Parse ``path`` in whichever schema it is written; problems are one line naming the field."""
    data = read_config_file(path)
    text = path.read_text()
    if is_mergekit(data):
        return read_mergekit(data, path, text)
    return read_tvq(data, path, text)


def read_tvq(data: dict[str, Any], path: Path, text: str = "") -> MergePlan:
    """tvq's schema: ``method``, its ``options`` (nested or flat), and optionally the inputs."""
    data = dict(data)
    method = data.pop("method", None)
    if method is not None and not isinstance(method, str):
        raise ConfigError(f"{where(path)}: method: expected a method name (got {method!r})")
    nested = data.pop("options", None)
    if nested is not None and not isinstance(nested, dict):
        raise ConfigError(f"{where(path)}: 'options' must be a mapping")
    inputs = {k: data.pop(k) for k in list(data) if k in TvqInputs.model_fields}
    try:
        given = TvqInputs.model_validate(inputs)
    except ValidationError as exc:
        raise ConfigError(f"{where(path)}: {validation_problem(exc, nested=True)}") from None
    options = {str(k).replace("-", "_"): v for k, v in {**(nested or {}), **data}.items()}
    return MergePlan(
        path, "tvq", method, options,
        pretrained=Path(given.pretrained) if given.pretrained is not None else None,
        packs=[Path(p) for p in given.packs],
        finetuned={name: Path(p) for name, p in given.finetuned.items()},
        tasks=given.tasks, task=given.task, unified=Path(given.unified) if given.unified is not None else None,
        dtype=given.dtype, norm_stats=given.norm_stats, quantize=given.quantize, text=text,
    )  # fmt: skip


def recorded(path: Path) -> str:
    """A model reference as a recipe holds it: absolute, so it replays from anywhere; a hub id as is."""
    return str(path) if hub_reference(path) else str(path.absolute())


def write_recipe(plan: MergePlan) -> str:
    """tvq's schema as YAML, every path absolute (hub ids as they are): ``tvq merge --config`` on it merges again."""
    data: dict[str, Any] = {"method": plan.method, "options": plan.options}
    if plan.pretrained is not None:
        data["pretrained"] = recorded(plan.pretrained)
    if plan.packs:
        data["packs"] = [recorded(p) for p in plan.packs]
    if plan.finetuned:
        data["finetuned"] = {name: recorded(p) for name, p in plan.finetuned.items()}
    if plan.unified is not None:
        data["unified"] = recorded(plan.unified)
    if plan.tasks is not None:
        data["tasks"] = list(plan.tasks)
    if plan.task is not None:
        data["task"] = plan.task
    data["dtype"] = plan.dtype or "same"
    if plan.norm_stats is not None:
        data["norm_stats"] = plan.norm_stats
    head = f"# tvq merge --config {RECIPE_FILE} --out OUT  reproduces this model, byte for byte\n"
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def quantize_options(step: QuantizeStep) -> QuantizeOptions:
    """A pipeline's quantize step as ``tvq quantize`` options (validated)."""
    opts = QuantizeOptions(
        target=step.target, bits=step.bits, residual=step.residual, base_bits=step.base_bits,
        error_correction=step.error_correction, key_rule=KeyRule(step.key_rule), quantizer=step.quantizer, group_size=step.group_size,
    )  # fmt: skip
    opts.validated()
    return opts


def run_quantize_step(
    step: QuantizeStep, *, overwrite: bool = False, progress: bool = True, executor: Executor | None = None
) -> QuantizeReport:
    """Write the pack a pipeline merges from (an existing one needs ``overwrite``, as for ``tvq quantize``)."""
    return quantize(step.pretrained, dict(step.finetuned), step.out, quantize_options(step),
                    overwrite=overwrite, progress=progress, executor=executor)  # fmt: skip
