"""One registry of merge methods, mergekit style: a method is one small class with a decorator.

A method sees one tensor at a time: ``merge_tensor(key, taus)`` gets the stacked fp32 task
vectors ``[T, *shape]`` of that tensor and returns the merged task vector. Methods that need
global statistics compute them in ``prepare`` (a cheap streaming pre-pass). Options are a
pydantic model with ``extra="forbid"``, so a typo is an error and not a silent default, and
strict types: ``true`` is not a number, ``"yes"`` not a boolean, and every float is finite.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tvq.config import integral, validation_problem
from tvq.errors import ConfigError
from tvq.merge.coded import combination_values, joint_index, lookup, worth_coding
from tvq.merge.source import NO_TASKS, TaskSource
from tvq.quant.coded import CodedTensor


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors, values are range-checked, types
    are strict and floats finite (a NaN λ would merge into a NaN model)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True, strict=True, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _from_text_formats(cls, data: Any) -> Any:
        """The two conversions strict types refuse but configs need: an exactly integral float
        is the int it equals (JSON/YAML ``4.0``), a string is a path for a Path option."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, f in cls.model_fields.items():
            kinds = {f.annotation, *get_args(f.annotation)}
            for key in {name, f.alias} & out.keys():
                if int in kinds:
                    out[key] = integral(out[key])
                if Path in kinds and isinstance(out[key], str):
                    out[key] = Path(out[key])
        return out

    @classmethod
    def names(cls) -> list[str]:
        """The option names users type (the alias when there is one, e.g. ``lambda``)."""
        return [f.alias or name for name, f in cls.model_fields.items()]


def tie_rule_field() -> Any:
    """The shared ``tie_rule`` option of the top-k methods (see tvq.merge.ops)."""
    return Field(
        "exact",
        description="entries tied at the top-k cut-off: exact keeps exactly the requested count "
        "(ties broken in hash order of the index, seeded by task and tensor name); keep_ties keeps them all (TIES reference)",
    )


@dataclass(frozen=True)
class KeptDensity:
    """The fraction of entries a top-k method kept, over the (task, tensor) pairs it trimmed."""

    requested: float
    kept: int  # entries kept, all pairs together
    total: int  # entries, all pairs together
    pairs: int
    mean: float  # unweighted mean over the pairs
    min: float
    max: float
    missing: int = 0  # pairs not counted (trimmed on remote workers with the keep_ties rule)

    @property
    def overall(self) -> float:
        return self.kept / self.total if self.total else 0.0

    @classmethod
    def of(cls, requested: float, counts: Iterable[tuple[int, int]], missing: int = 0) -> KeptDensity | None:
        pairs = [(kept, n) for kept, n in counts if n > 0]
        if not pairs:
            return None
        fractions = [kept / n for kept, n in pairs]
        return cls(requested, sum(k for k, _ in pairs), sum(n for _, n in pairs), len(pairs),
                   sum(fractions) / len(fractions), min(fractions), max(fractions), missing)  # fmt: skip

    def line(self) -> str:
        """``kept 20.0 % of entries (requested 20.0 %; per task and tensor: mean 19.6 %, min 12.5 %, max 20.0 %)``"""
        text = (
            f"kept {100 * self.overall:.1f} % of entries (requested {100 * self.requested:.1f} %; per task and tensor: "
            f"mean {100 * self.mean:.1f} %, min {100 * self.min:.1f} %, max {100 * self.max:.1f} %)"
        )
        return text + (f", {self.missing} task-tensor pairs not counted (remote workers)" if self.missing else "")


Blocks = Callable[[], Iterator[tuple[int, torch.Tensor]]]  # a fresh pass over one tensor: (first flat element, [T, m] fp32 block)
Parts = Callable[[], Iterator[list[CodedTensor | torch.Tensor]]]  # a fresh pass: each block as every task's part, as read


@dataclass(frozen=True)
class BlockPasses:
    """Fresh passes over one tensor's blocks, in order: ``dense`` gives each block as a ``[T, m]``
    fp32 stack, ``parts`` as every task's part as read (a value table and codes where the input
    is coded, else fp32 values: statistics from code histograms decode no values)."""

    dense: Blocks
    parts: Parts


class BlockMerger:
    """One tensor merged block by block (flat ``[T, m]`` blocks in order; ``start`` is a block's
    first element): an elementwise method's own merge of each block, which needs no statistics
    of the tensor. Methods with per-tensor statistics return their own (``block_merger``)."""

    def __init__(self, method: MergeMethod, key: str) -> None:
        self.method, self.key = method, key

    def merge_tensor(self, start: int, taus: torch.Tensor) -> torch.Tensor:
        return self.method.merge_tensor(self.key, taus)

    def merge_coded(self, start: int, coded: list[CodedTensor]) -> torch.Tensor | None:
        return self.method.merge_coded(self.key, coded)


class MergeMethod(ABC):
    """A merge method. Subclasses set ``Options`` and implement ``merge_tensor``."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    per_task: ClassVar[bool] = False  # yields one model per task (EMR): needs ``task`` or writes a pack
    # merge_tensor's result for an element depends only on that element's T values (no
    # per-tensor statistics, reductions over tasks in a fixed order): packs can then be
    # merged from codes through a lookup table, with the same bytes (tvq.merge.coded)
    elementwise: ClassVar[bool] = False
    # whether its blocks merge on a GPU (``--device cuda``) with the same bytes as on the host,
    # checked by benchmarks/device.py on one; the others merge on the host whatever --device says
    # (``runs_on_device`` may narrow it by options)
    on_device: ClassVar[bool] = False
    # where ``prepare``'s passes may compute (set by the engine from ``--device`` when
    # ``runs_on_device``; None: the host), with the host's bytes
    prepass_device: torch.device | None = None
    # whether merging by blocks costs extra passes over a tensor's blocks (per-tensor statistics);
    # None: a method that overrides ``block_merger`` is taken to (``memory_note``)
    block_prepasses: ClassVar[bool | None] = None
    # the options under which ``merges_by_blocks`` says yes, when not all (``memory_note``)
    blocks_when: ClassVar[str] = ""
    # shown after the options in ``tvq merge --help``: what a method needs beyond the stack
    # of one tensor (e.g. the SVD methods' dense matrices and decomposition buffers)
    note: ClassVar[str] = ""

    def __init__(self, options: MethodOptions, tasks: list[str], task: str | None = None) -> None:
        self.options = options
        self.tasks = list(tasks)
        self.task = task
        self.kept_counts: dict[tuple[str, str], tuple[int, int]] = {}  # (task, key) -> (entries kept, entries)

    def topk_density(self) -> float | None:
        """The density a top-k trim was asked for (None: the method has no top-k)."""
        return None

    def exact_kept(self, key: str, shape: tuple[int, ...]) -> int | None:
        """The entries of one task's tensor the trim keeps by construction (the exact rule), to
        count tensors merged on remote workers; None when it depends on the values."""
        return None

    def trims(self, key: str, shape: tuple[int, ...]) -> bool:
        """Whether the top-k trim applies to this tensor (counted in ``kept_density``)."""
        return True

    def record_kept(self, key: str, kept: Sequence[int | None], numel: int) -> None:
        """Note the entries each task kept in one tensor (each key is merged once; a dict
        item assignment is atomic, so merge threads can record side by side)."""
        for task, count in zip(self.tasks, kept, strict=True):
            if count is not None:
                self.kept_counts[(task, key)] = (int(count), numel)

    def kept_density(self, source: TaskSource) -> KeptDensity | None:
        """What the top-k trim kept over the whole merge (None for methods without one)."""
        requested = self.topk_density()
        if requested is None:
            return None
        counts, missing = [], 0
        for key in source.keys:
            shape = tuple(source.shape(key))
            if not self.trims(key, shape):
                continue
            for task in self.tasks:
                if (task, key) in self.kept_counts:
                    counts.append(self.kept_counts[(task, key)])
                elif (kept := self.exact_kept(key, shape)) is not None:
                    counts.append((kept, source.numel(key)))
                else:
                    missing += 1
        return KeptDensity.of(requested, counts, missing)

    def prepare(self, source: TaskSource, progress: bool = False) -> None:  # noqa: B027 (optional hook)
        """Global statistics before the streaming pass (default: none needed)."""

    @abstractmethod
    def merge_tensor(self, key: str, taus: torch.Tensor) -> torch.Tensor:
        """The merged task vector of one tensor. ``taus`` is ``[T, *shape]`` fp32, owned by the method."""

    def merge_coded(self, key: str, coded: list[CodedTensor]) -> torch.Tensor | None:
        """The merged task vector from coded task vectors (``tvq.merge.coded``), or None to
        have the dense ``[T, *shape]`` stack merged instead. Elementwise methods run
        ``merge_tensor`` once per combination of codes and look the elements up."""
        if not self.elementwise or not worth_coding(coded):
            return None
        lut = self.merge_tensor(key, combination_values(coded))
        return lookup(lut, joint_index(coded))

    def runs_on_device(self) -> bool:
        """Whether ``--device`` moves this merge's blocks (``on_device``, under these options)."""
        return self.on_device

    def streams_on_device(self, key: str, numel: int) -> bool:
        """``merges_by_blocks`` when the blocks merge on a GPU (``--device``): a method whose
        host rule weighs a whole-tensor path that only the host has may stream more there."""
        return self.merges_by_blocks(key, numel)

    def merges_by_blocks(self, key: str, numel: int) -> bool:
        """Whether ``merge_tensor`` (and ``merge_coded``) may run on ``key`` (``numel`` elements) a block of elements at
        a time (flat ``[T, n]`` blocks, in order) with the same bytes as on the whole tensor, so
        the engine streams large tensors (tvq.merge.blocks): elementwise methods do; a method
        whose per-tensor statistics come from ``prepare`` may say so too. The rest merge each
        tensor whole, (T + 3) fp32 copies of it."""
        return self.elementwise

    def block_merger(self, key: str, numel: int, passes: BlockPasses) -> BlockMerger:
        """How ``key`` (``numel`` elements; ``merges_by_blocks``) merges by blocks: after any
        per-tensor statistics, computed exactly from fresh passes over its blocks (``passes``),
        an object that merges each block as the whole tensor would merge those elements."""
        return BlockMerger(self, key)

    def write_pack(self, source: TaskSource, out: Path, progress: bool = False) -> None:
        """Per-task methods only: write the compact all-tasks artifact instead of one model."""
        raise NotImplementedError


_METHODS: dict[str, type[MergeMethod]] = {}
_ALIASES: dict[str, str] = {}
M = TypeVar("M", bound=type[MergeMethod])


def merge_method(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[M], M]:
    """Class decorator: ``@merge_method("ties", aliases=("ties_merging",))``."""

    def register(cls: M) -> M:
        for n in (name, *aliases):
            if n in _METHODS or n in _ALIASES:
                raise ValueError(f"merge method name {n!r} registered twice")
        cls.name, cls.aliases = name, tuple(aliases)
        _METHODS[name] = cls
        _ALIASES.update(dict.fromkeys(aliases, name))
        return cls

    return register


BUILTIN_METHODS = "tvq.merge.methods"  # a package whose modules register themselves


def _registered() -> dict[str, type[MergeMethod]]:
    """The registry, with the built-in methods loaded (once) like plugins: by name, since
    they import this module to register."""
    import_module(BUILTIN_METHODS)
    return _METHODS


def available_methods() -> dict[str, type[MergeMethod]]:
    """Canonical name -> class, sorted by name."""
    return dict(sorted(_registered().items()))


def method_class(name: str) -> type[MergeMethod]:
    """Resolve a name or alias; unknown names fail with the list of valid ones."""
    _registered()
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        valid = ", ".join(f"{n} ({', '.join(c.aliases)})" if c.aliases else n for n, c in sorted(_METHODS.items()))
        raise ConfigError(f"unknown merge method {name!r} (valid methods: {valid})")
    return _METHODS[key]


def parse_options(cls: type[MergeMethod], options: Mapping[str, Any] | MethodOptions | None) -> MethodOptions:
    """Validate options for ``cls``; errors are one line naming the valid options."""
    if isinstance(options, cls.Options):
        return options
    if isinstance(options, MethodOptions):
        options = options.model_dump(by_alias=True)
    data = {str(k).replace("-", "_"): v for k, v in (options or {}).items()}
    valid = cls.Options.names()
    accepted = set(valid) | set(cls.Options.model_fields)
    for key in data:
        if key not in accepted:
            listing = ", ".join(valid) if valid else "none"
            raise ConfigError(f"merge method {cls.name!r}: unknown option {key!r} (valid options: {listing})")
    try:
        return cls.Options.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = cls.Options.model_fields.get(str(first["loc"][0])) if first["loc"] else None
        if first["type"] == "missing" and field is not None:
            shown = field.alias or str(first["loc"][0])
            raise ConfigError(f"merge method {cls.name!r}: option {shown!r} is required ({field.description})") from None
        if not first["loc"]:  # a rule across options (a model validator): its own words
            raise ConfigError(f"merge method {cls.name!r}: invalid options: {first['msg']}") from None
        aliases = {n: f.alias for n, f in cls.Options.model_fields.items() if f.alias}
        raise ConfigError(f"merge method {cls.name!r}: {validation_problem(exc, aliases)}") from None


def build_method(name: str, options: Mapping[str, Any] | MethodOptions | None, tasks: list[str], task: str | None = None) -> MergeMethod:
    """Name + options + task names -> a ready method object (everything validated)."""
    cls = method_class(name)
    opts = parse_options(cls, options)
    if not tasks:
        raise ConfigError(NO_TASKS)
    if task is not None:
        if not cls.per_task:
            raise ConfigError(f"--task only applies to per-task methods (emr); {cls.name!r} writes one merged model")
        if task not in tasks:
            raise ConfigError(f"--task {task!r} is not one of the tasks: {', '.join(tasks)}")
    return cls(opts, tasks, task)


def option_type(annotation: Any) -> str:
    """An option's type as help shows it: FLOAT, INT, BOOL, PATH, a|b|c, {TASK: FLOAT}, ..."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return option_type(args[0])
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, UnionType):
        return "|".join(option_type(a) for a in args if a is not type(None))
    if origin is dict:
        return "{" + ("TASK" if args and args[0] is str else "KEY") + ": " + (option_type(args[1]) if len(args) > 1 else "VALUE") + "}"
    if origin is list:
        return "[" + (option_type(args[0]) if args else "VALUE") + ", ...]"
    names = {float: "FLOAT", int: "INT", bool: "BOOL", str: "TEXT", Path: "PATH"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)).upper())


def _bounds(f: Any) -> str:
    """`` in [0, 1]`` from a field's ge/le/gt/lt constraints."""
    low = next((("[", m.ge) for m in f.metadata if getattr(m, "ge", None) is not None), None)
    low = low or next((("(", m.gt) for m in f.metadata if getattr(m, "gt", None) is not None), None)
    high = next(((m.le, "]") for m in f.metadata if getattr(m, "le", None) is not None), None)
    high = high or next(((m.lt, ")") for m in f.metadata if getattr(m, "lt", None) is not None), None)
    if low is None and high is None:
        return ""
    lo = f"{low[0]}{low[1]:g}" if low else "(-inf"
    hi = f"{high[0]:g}{high[1]}" if high else "inf)"
    return f" in {lo}, {hi}"


def describe_option(name: str, f: Any) -> str:
    """``--density FLOAT in [0, 1] (default 0.2): fraction of each task vector kept``"""
    flag = name.replace("_", "-")
    kind = option_type(f.annotation)
    shown = f"--{flag}/--no-{flag}" if kind == "BOOL" else f"--{flag} {kind}{_bounds(f)}"
    default = "required" if f.is_required() else ("default auto" if f.default is None else f"default {f.default}")
    return f"{shown} ({default}): {f.description or ''}".rstrip(": ")


WHOLE_NOTE = "merges each tensor whole: about (T + 3) fp32 copies of the largest"


def memory_note(cls: type[MergeMethod]) -> str:
    """How a method holds a tensor while merging it (shown in ``tvq merge --help``)."""
    if cls.elementwise or cls.merges_by_blocks is not MergeMethod.merges_by_blocks:
        prepasses = cls.block_prepasses if cls.block_prepasses is not None else cls.block_merger is not MergeMethod.block_merger
        passes = ", its per-tensor statistics from extra passes over them" if prepasses else ""
        when = f" (with {cls.blocks_when}; else {WHOLE_NOTE})" if cls.blocks_when else ""
        return f"streams large tensors by blocks into safetensors outputs{passes}: memory independent of the tensor's size{when}"
    return WHOLE_NOTE


def describe_methods(detailed: bool = False) -> str:
    """One line per method with its options and defaults (for ``tvq merge --help``); with
    ``detailed``, then one indented line per option: flag, type, range, default, meaning."""
    lines = []
    for name, cls in available_methods().items():
        opts = []
        for field_name, f in cls.Options.model_fields.items():
            default = "required" if f.is_required() else ("auto" if f.default is None else f.default)
            opts.append(f"{f.alias or field_name}={default}")
        alias = f" ({', '.join(cls.aliases)})" if cls.aliases else ""
        note = f" [{'; '.join(n for n in (cls.note, memory_note(cls)) if n)}]"
        lines.append(f"{name}{alias}: {', '.join(opts) or 'no options'}{note}")
        if detailed:
            lines.extend(f"  {describe_option(f.alias or n, f)}" for n, f in cls.Options.model_fields.items())
    return "\n".join(lines)


def write_methods_help(path: Path = Path(__file__).parent.parent / "methods_help.py") -> None:
    """Regenerate ``tvq.methods_help`` (``python -c "from tvq.merge.registry import
    write_methods_help; write_methods_help()"``): ``tvq merge --help`` shows it without
    importing torch; tests/merge/test_merge_cli.py fails when it is stale."""
    lines = describe_methods(detailed=True).split("\n")
    body = "".join(f"    {json.dumps(line, ensure_ascii=False)},\n" for line in lines)
    path.write_text(
        "# ruff: noqa: E501  (generated: one help line per string)\n"
        '"""Generated by tvq.merge.registry.write_methods_help: the built-in methods and their options, so that\n'
        '``tvq merge --help`` answers without importing torch. Do not edit; regenerate."""\n\n'
        f"LINES = [\n{body}]\nTEXT = \"\\n\".join(LINES)\n"
    )
