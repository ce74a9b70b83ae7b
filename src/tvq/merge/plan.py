"""What a merge config file asks for, whatever its schema (tvq's own or mergekit's): the
method and its options, the inputs, the output dtype, and an optional quantize step first.

``tvq merge --config FILE`` reads one (``tvq.merge.recipe.read_recipe``); command-line
flags override it. Paths are as written (relative ones are relative to the working
directory, as in mergekit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tvq.config import STRICT, Bits, Integer

Schema = Literal["tvq", "mergekit"]


class QuantizeStep(BaseModel):
    """A pipeline's ``quantize:`` section: the pack the merge then reads (``tvq quantize``'s options)."""

    model_config = STRICT

    pretrained: str = Field(description="pretrained checkpoint (file or HF folder)")
    finetuned: dict[str, str] = Field(description="task name -> fine-tuned checkpoint")
    out: str = Field(description="the pack to write (then merged from)")
    target: Literal["task_vector", "finetuned"] = "task_vector"
    bits: Bits = 4
    residual: bool = False
    base_bits: Bits | None = None
    error_correction: bool = False
    key_rule: Literal["ndim", "paper"] = "ndim"
    quantizer: str = "minmax"
    group_size: Integer = 128


@dataclass
class MergePlan:
    """A merge as a config file describes it; None/empty fields are left to the command line."""

    path: Path
    schema: Schema
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: Path | None = None
    packs: list[Path] = field(default_factory=list)
    finetuned: dict[str, Path] = field(default_factory=dict)
    tasks: list[str] | None = None  # the merge's tasks in order (None: every task of the inputs)
    task: str | None = None  # per-task methods (EMR): the task whose model is written (None: the unified pack)
    unified: Path | None = None  # EMR: the unified pack the task's model is read from (instead of packs)
    dtype: str | None = None
    norm_stats: str | None = None
    quantize: QuantizeStep | None = None
    text: str = ""  # the file as written (kept beside a merged folder as mergekit_config.yml)
