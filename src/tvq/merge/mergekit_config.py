"""mergekit's merge YAML, read as mergekit means it, into a tvq merge (``tvq merge --config``).

Accepted as mergekit writes it: ``merge_method``, ``base_model``, ``models: [{model, parameters}]``,
top-level ``parameters``, ``dtype`` / ``out_dtype``, ``tokenizer_source``. A ``model`` is a
checkpoint (file or folder), a pack task ``PACK#TASK``, or a whole pack ``PACK`` (each of its
tasks with the entry's parameters). mergekit's defaults and semantics are kept (λ = 1, per-tensor
top-k, ``normalize`` per method, weights required, the L1 rescaling of DARE/DELLA), so a config
gives the model mergekit would give, up to the documented differences (docs/merging.md). What tvq
cannot honour (``slices``, gradients and filters over layers, ``tokenizer_source: union``, a
per-model value where the tvq method takes one value, ...) is one line naming the file and the
field, never a silent default.

Method by method (mergekit -> tvq):

========================  ==================================================================
task_arithmetic, linear   task_arithmetic (per-task ``weight``, ``normalize``, ``lambda``)
ties                      ties, scope=tensor, per-task weight and density, aggregate=mean (normalize) or sum
dare_ties / dare_linear   dare_ties (no TIES trim: density=1, scope=tensor) / dare, base=task_arithmetic;
                          per-task drop_rate = 1 − density and weight, rescale_mode=l1
breadcrumbs(_ties)        breadcrumbs(_ties), scope=tensor, per-task weight, density, gamma
della / della_linear      della / della_linear (per-task weight, density, epsilon), rescale_mode=l1
model_stock               model_stock (filter_wise)
========================  ==================================================================

A uniform per-model ``weight`` on DARE and Breadcrumbs folds into λ exactly as mergekit's
arithmetic does (a weighted mean of equally weighted deltas is their mean; an unnormalized one
is w × their sum), which keeps their unweighted paths; differing weights go per task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tvq.config import validation_problem
from tvq.errors import ConfigError, where
from tvq.merge.plan import MergePlan, QuantizeStep
from tvq.pack.manifest import MANIFEST_NAME
from tvq.pack.reader import open_pack

_GTA_GLOBALS = ("int8_mask", "normalize", "rescale", "lambda")


class ModelEntry(BaseModel):
    """One of ``models``: a model reference and its per-model parameters."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    parameters: dict[str, Any] | None = None


class MergekitConfig(BaseModel):
    """mergekit's ``MergeConfiguration`` (mergekit/config.py), plus tvq's ``quantize:`` step."""

    model_config = ConfigDict(extra="forbid", strict=True)

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: Any = None
    modules: Any = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: Any = None
    chat_template: str | None = None
    quantize: QuantizeStep | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A mergekit method as tvq runs it: its parameters, defaults, and the translation."""

    globals: tuple[str, ...]
    per_model: dict[str, float | None]  # name -> mergekit default (None: required)
    normalize: bool | None  # mergekit's default for ``normalize`` (None: no such parameter)
    rescale: bool = False  # mergekit's default for ``rescale``
    translate: Callable[[Recipe], tuple[str, dict[str, Any]]] | None = None


@dataclass
class Recipe:
    """Parameters resolved to plain values: globals, and per task the per-model ones."""

    path: Path
    method: str
    globals: dict[str, Any]
    per_task: dict[str, dict[str, float]]  # task -> parameter -> value

    def values(self, name: str) -> dict[str, float]:
        return {task: params[name] for task, params in self.per_task.items()}

    def one(self, name: str, tvq_method: str) -> float:
        """A per-model parameter that tvq's method takes once for all tasks: equal everywhere, or one line."""
        values = self.values(name)
        distinct = sorted(set(values.values()))
        if len(distinct) > 1:
            shown = ", ".join(f"{t}={v:g}" for t, v in values.items())
            raise ConfigError(
                f"{where(self.path)}: models[].parameters.{name}: tvq's {tvq_method} takes one {name} for every model "
                f"(given {shown}); per-model values: ties, dare_*, breadcrumbs*, della* (weight, density, gamma, epsilon), "
                "task_arithmetic, linear (weight)"
            )
        return distinct[0]

    def weight_scale(self, tvq_method: str, consensus: bool) -> float:
        """The factor a uniform weight w puts on λ: mergekit's Σ w δ (÷ Σ w with ``normalize``)."""
        w = self.one("weight", tvq_method)
        if self.globals["normalize"]:
            if consensus:  # Σ w δ[agree] / Σ w [agree]: w cancels (a zero sum leaves the base)
                return 1.0 if w != 0 else 0.0
            total = w * len(self.per_task)
            return w / total if abs(total) >= 1e-8 else w
        return w

    def per_task_or_one(self, name: str) -> float | dict[str, float]:
        values = self.values(name)
        distinct = set(values.values())
        return next(iter(distinct)) if len(distinct) == 1 else values

    def refuse(self, name: str, why: str) -> None:
        raise ConfigError(f"{where(self.path)}: parameters.{name}: {why}")


def _no_rescale(r: Recipe, method: str) -> None:
    if r.globals["rescale"]:
        r.refuse("rescale", f"mergekit's L1 rescaling after a top-k trim is not in tvq's {method}")


def _task_arithmetic(r: Recipe) -> tuple[str, dict[str, Any]]:
    _no_rescale(r, "task_arithmetic")
    if any(v != 1 for v in r.values("density").values()):
        raise ConfigError(f"{where(r.path)}: models[].parameters.density: task_arithmetic does not sparsify (use ties, dare_linear, ...)")
    return "task_arithmetic", {"lambda": r.globals["lambda"], "weight": r.per_task_or_one("weight"), "normalize": r.globals["normalize"]}


def _linear(r: Recipe) -> tuple[str, dict[str, Any]]:
    weights = r.values("weight")
    total = sum(weights.values())
    if not r.globals["normalize"] and abs(total - 1) > 1e-6:
        r.refuse(
            "normalize",
            f"linear without normalize scales the models themselves (weights sum to {total:g}, not 1); "
            "tvq merges task vectors: normalize, or weights that sum to 1 (the base model listed with its weight)",
        )
    return "task_arithmetic", {"lambda": 1.0, "weight": r.per_task_or_one("weight"), "normalize": r.globals["normalize"]}


def _ties(r: Recipe) -> tuple[str, dict[str, Any]]:
    _no_rescale(r, "ties")
    r.per_task = {t: {**p, "density": min(p["density"], 1.0)} for t, p in r.per_task.items()}  # >= 1 keeps the tensor whole
    aggregate = "mean" if r.globals["normalize"] else "sum"
    opts = {"scope": "tensor", "density": r.per_task_or_one("density"), "lambda": r.globals["lambda"], "aggregate": aggregate}
    return "ties", {**opts, "weight": r.per_task_or_one("weight")}


def _per_task_weights(r: Recipe, tvq_method: str, consensus: bool) -> tuple[float, float | dict[str, float]]:
    """λ and the ``weight`` option: a uniform weight folds into λ (``weight_scale``, the paths
    without weights); differing weights go per task, pre-divided by Σ w for a normalized linear
    method (mergekit's Σ w δ / Σ w; a consensus method's ``aggregate`` divides by the agreeing weights)."""
    weights = r.values("weight")
    if len(set(weights.values())) == 1:
        return r.globals["lambda"] * r.weight_scale(tvq_method, consensus), 1.0
    total = sum(weights.values())
    if r.globals["normalize"] and not consensus and abs(total) >= 1e-8:
        weights = {t: w / total for t, w in weights.items()}
    return r.globals["lambda"], weights


def _drop_rates(r: Recipe) -> float | dict[str, float]:
    """DARE's drop rate per task: 1 − density (mergekit: density >= 1 keeps the tensor whole)."""
    rates = {t: 1.0 - min(d, 1.0) for t, d in r.values("density").items()}
    return next(iter(rates.values())) if len(set(rates.values())) == 1 else rates


def _dare(consensus: bool) -> Callable[[Recipe], tuple[str, dict[str, Any]]]:
    def translate(r: Recipe) -> tuple[str, dict[str, Any]]:
        name = "dare_ties" if consensus else "dare"
        lam, weight = _per_task_weights(r, name, consensus)
        opts: dict[str, Any] = {"drop_rate": _drop_rates(r), "rescale": r.globals["rescale"], "rescale_mode": "l1", "lambda": lam}
        if weight != 1.0:
            opts["weight"] = weight
        if consensus:
            opts.update(density=1.0, scope="tensor", aggregate="mean" if r.globals["normalize"] else "sum")
        else:
            opts["base"] = "task_arithmetic"
        return name, opts

    return translate


def _breadcrumbs(consensus: bool) -> Callable[[Recipe], tuple[str, dict[str, Any]]]:
    def translate(r: Recipe) -> tuple[str, dict[str, Any]]:
        name = "breadcrumbs_ties" if consensus else "breadcrumbs"
        _no_rescale(r, name)
        densities: dict[str, float] = {}
        gammas: dict[str, float] = {}
        for task, params in r.per_task.items():
            densities[task] = min(params["density"], 1.0)
            gammas[task] = 0.0 if densities[task] >= 1 else params["gamma"]  # mergekit keeps a tensor whole at density >= 1
            if densities[task] + gammas[task] > 1:
                raise ConfigError(
                    f"{where(r.path)}: models[].parameters.gamma: density + gamma = {densities[task] + gammas[task]:g} > 1 "
                    f"for {task} (mergekit then removes fewer outliers; tvq needs density + gamma <= 1)"
                )
        lam, weight = _per_task_weights(r, name, consensus)
        opts: dict[str, Any] = {"scope": "tensor", "density": _one_or_all(densities), "gamma": _one_or_all(gammas), "lambda": lam}
        if weight != 1.0:
            opts["weight"] = weight
        if consensus:
            opts["aggregate"] = "mean" if r.globals["normalize"] else "sum"
        return name, opts

    return translate


def _one_or_all(values: dict[str, float]) -> float | dict[str, float]:
    return next(iter(values.values())) if len(set(values.values())) == 1 else values


def _della(name: str) -> Callable[[Recipe], tuple[str, dict[str, Any]]]:
    def translate(r: Recipe) -> tuple[str, dict[str, Any]]:
        opts: dict[str, Any] = {k: r.per_task_or_one(k) for k in ("weight", "density", "epsilon")}
        opts.update({"lambda": r.globals["lambda"], "normalize": r.globals["normalize"], "rescale": r.globals["rescale"], "rescale_mode": "l1"})
        return name, opts

    return translate


def _model_stock(r: Recipe) -> tuple[str, dict[str, Any]]:
    return "model_stock", {"filter_wise": r.globals["filter_wise"]}


_GTA = {"weight": None, "density": 1.0}
METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(("normalize",), {"weight": None}, True, translate=_linear),
    "task_arithmetic": MethodSpec(_GTA_GLOBALS, _GTA, False, translate=_task_arithmetic),
    "ties": MethodSpec(_GTA_GLOBALS, _GTA, True, translate=_ties),
    "dare_ties": MethodSpec(_GTA_GLOBALS, _GTA, False, rescale=True, translate=_dare(True)),
    "dare_linear": MethodSpec(_GTA_GLOBALS, _GTA, False, rescale=True, translate=_dare(False)),
    "breadcrumbs": MethodSpec(_GTA_GLOBALS, {**_GTA, "gamma": 0.01}, False, translate=_breadcrumbs(False)),
    "breadcrumbs_ties": MethodSpec(_GTA_GLOBALS, {**_GTA, "gamma": 0.01}, False, translate=_breadcrumbs(True)),
    "della": MethodSpec(_GTA_GLOBALS, {**_GTA, "epsilon": 0.15}, True, rescale=True, translate=_della("della")),
    "della_linear": MethodSpec(_GTA_GLOBALS, {**_GTA, "epsilon": 0.15}, False, rescale=True, translate=_della("della_linear")),
    "model_stock": MethodSpec(("filter_wise",), {}, None, translate=_model_stock),
}
_GLOBAL_DEFAULTS: dict[str, Any] = {"int8_mask": False, "lambda": 1.0, "filter_wise": False}
_DTYPES = ("float32", "float16", "bfloat16")
_BOOLS = {"int8_mask", "normalize", "rescale", "filter_wise"}


def is_mergekit(data: dict) -> bool:
    """mergekit's schema names its method ``merge_method``; tvq's own says ``method``."""
    return "merge_method" in data


def setting_value(setting: Any, field: str, path: Path) -> Any:
    """One value from a mergekit ``ParameterSetting``: a scalar, or a gradient / filtered list
    that is the same everywhere; anything varying over layers or tensors is one line."""
    if isinstance(setting, dict) and set(setting) <= {"value", "filter"} and "value" in setting:
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(c, dict) for c in setting):
            first = setting[0]
            if len(setting) == 1 and first.get("filter") in (None, "*") and set(first) <= {"value", "filter"}:
                return setting_value(first.get("value"), field, path)
            raise ConfigError(f"{where(path)}: {field}: values filtered by tensor name are not supported by tvq (one value for every tensor)")
        if setting and len({repr(v) for v in setting}) == 1:
            return setting_value(setting[0], field, path)
        raise ConfigError(f"{where(path)}: {field}: gradients over layers ({setting!r}) are not supported by tvq (one value for every layer)")
    if isinstance(setting, (bool, int, float)):
        return setting
    raise ConfigError(f"{where(path)}: {field}: expected a number or true/false (got {setting!r})")


def _number(value: Any, field: str, path: Path, boolean: bool = False) -> Any:
    if boolean:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(path)}: {field}: expected true or false (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where(path)}: {field}: expected a number (got {value!r})")
    return float(value)


@dataclass(frozen=True)
class ModelRef:
    """A ``models`` entry resolved: task names and where each comes from."""

    kind: str  # "pack" or "checkpoint"
    path: Path
    tasks: tuple[str, ...]


def resolve_model(ref: str, field: str, path: Path, quantize: QuantizeStep | None) -> ModelRef:
    """``PACK#TASK``, ``PACK`` (every task) or a checkpoint path (the task is its file stem / folder name)."""
    pack, hash_, task = ref.partition("#")
    planned = quantize is not None and Path(pack) == Path(quantize.out)
    if hash_:
        if not task:
            raise ConfigError(f"{where(path)}: {field}: {ref!r}: expected PACK#TASK")
        return ModelRef("pack", Path(pack), (task,))
    p = Path(ref)
    if planned:
        assert quantize is not None
        return ModelRef("pack", p, tuple(quantize.finetuned))
    if (p / MANIFEST_NAME).is_file():
        return ModelRef("pack", p, tuple(open_pack(p).tasks))
    if "+" in ref and not p.exists():
        raise ConfigError(f"{where(path)}: {field}: {ref!r}: LoRA adapters (MODEL+LORA) are not supported by tvq")
    return ModelRef("checkpoint", p, (p.stem if p.is_file() else p.name,))


def translate(cfg: MergekitConfig, path: Path, text: str = "") -> MergePlan:
    """A validated mergekit config -> a tvq ``MergePlan`` (method, options, inputs, dtype)."""
    for name in ("slices", "modules"):
        if getattr(cfg, name) is not None:
            raise ConfigError(f"{where(path)}: {name}: tvq merges whole models; mergekit's slices and modules (layer stacking) are not supported")
    if cfg.tokenizer is not None or cfg.chat_template is not None:
        field = "tokenizer" if cfg.tokenizer is not None else "chat_template"
        raise ConfigError(f"{where(path)}: {field}: not supported by tvq (it copies the base model's tokenizer files: tokenizer_source: base)")
    if cfg.tokenizer_source not in (None, "base", cfg.base_model):
        raise ConfigError(
            f"{where(path)}: tokenizer_source: {cfg.tokenizer_source!r} is not supported by tvq (it copies the base model's tokenizer: base)"
        )
    spec = METHODS.get(cfg.merge_method.strip().lower())
    if spec is None or spec.translate is None:
        raise ConfigError(
            f"{where(path)}: merge_method: {cfg.merge_method!r} is not a method tvq runs from a mergekit config "
            f"(supported: {', '.join(METHODS)})"
        )
    if not cfg.models:
        raise ConfigError(f"{where(path)}: models: the models to merge are missing")
    method = cfg.merge_method.strip().lower()
    base = cfg.base_model
    if base is None:
        if method != "linear":
            raise ConfigError(f"{where(path)}: base_model: {method} merges task vectors against a base_model; it is missing")
        base = cfg.models[0].model  # Σ w θ / Σ w: any one of the models serves as the base of the task vectors

    top = dict(cfg.parameters or {})
    known = set(spec.globals) | set(spec.per_model)
    for name in top:
        if name not in known:
            valid = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"{where(path)}: parameters.{name}: not a parameter of mergekit's {method} (its parameters: {valid})")
    for name in set(top) & set(spec.per_model):  # defaults for every model: checked even where a model overrides them
        _number(setting_value(top[name], f"parameters.{name}", path), f"parameters.{name}", path)
    globals_: dict[str, Any] = {}
    for name in spec.globals:
        default = spec.normalize if name == "normalize" else spec.rescale if name == "rescale" else _GLOBAL_DEFAULTS[name]
        value = setting_value(top[name], f"parameters.{name}", path) if name in top else default
        globals_[name] = _number(value, f"parameters.{name}", path, boolean=name in _BOOLS)

    per_task: dict[str, dict[str, float]] = {}
    packs: list[Path] = []
    finetuned: dict[str, Path] = {}
    for i, entry in enumerate(cfg.models):
        field = f"models[{i}]"
        ref = resolve_model(entry.model, f"{field}.model", path, cfg.quantize)
        is_base = ref.kind == "checkpoint" and Path(entry.model) == Path(base)
        if is_base and method != "linear":
            continue  # mergekit: the base model's delta is zero and is left out
        params = dict(entry.parameters or {})
        values: dict[str, float] = {}
        for name in params:
            if name not in spec.per_model:
                kind = "a global parameter (put it under the top-level parameters)" if name in spec.globals else "not a parameter"
                raise ConfigError(f"{where(path)}: {field}.parameters.{name}: {kind} of mergekit's {method}")
        for name, default in spec.per_model.items():
            where_ = f"{field}.parameters.{name}" if name in params else f"parameters.{name}"
            setting = params.get(name, top.get(name, default))
            if setting is None:
                raise ConfigError(f"{where(path)}: {field}.parameters.{name}: required by mergekit's {method}")
            values[name] = _number(setting_value(setting, where_, path), where_, path)
        for task in ref.tasks:
            if task in per_task:
                raise ConfigError(f"{where(path)}: {field}.model: task {task!r} appears twice (name checkpoints apart by file or folder name)")
            per_task[task] = dict(values)
        if ref.kind == "pack":
            if ref.path not in packs:
                packs.append(ref.path)
        else:
            finetuned[ref.tasks[0]] = ref.path
    if not per_task:
        raise ConfigError(f"{where(path)}: models: no model besides the base_model")
    name, options = spec.translate(Recipe(path, method, globals_, per_task))
    dtype = None
    for field in ("out_dtype", "dtype"):
        value = getattr(cfg, field)
        if value is not None and dtype is None:
            dtype = value.removeprefix("torch.")
            if dtype not in _DTYPES:
                supported = ", ".join(_DTYPES)
                raise ConfigError(f"{where(path)}: {field}: {value!r} is not an output dtype tvq writes ({supported}; tvq computes in float32)")
    return MergePlan(path, "mergekit", name, options, Path(base), packs, finetuned, list(per_task), dtype=dtype, quantize=cfg.quantize, text=text)


def read_mergekit(data: dict, path: Path, text: str = "") -> MergePlan:
    """Validate a parsed mergekit YAML (one line on the first problem) and translate it."""
    unknown = sorted(set(data) - set(MergekitConfig.model_fields))
    if unknown:
        raise ConfigError(f"{where(path)}: {unknown[0]}: not a field of a mergekit config (fields: {', '.join(MergekitConfig.model_fields)})")
    try:
        cfg = MergekitConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where(path)}: {validation_problem(exc, nested=True)}") from None
    return translate(cfg, path, text)
