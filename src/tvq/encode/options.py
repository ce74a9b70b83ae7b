"""What to quantize and how: the options of one pack, and per-tensor bit widths.

Separate from the pipeline so the job type, every encoder and the pipeline can share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from tvq.errors import ConfigError
from tvq.pack.manifest import Method
from tvq.pack.validate import MAX_GROUP_SIZE
from tvq.quant.bits import check_bits
from tvq.quant.schemes import Quantizer, get_scheme, quantizer
from tvq.quant.selection import KeyRule


@dataclass
class BitPlan:
    """Bit widths chosen per tensor (and for the RTVQ base) under a memory budget."""

    budget_bits: float
    bits: dict[str, int]
    base_bits: dict[str, int] = field(default_factory=dict)
    budget_bytes: int | None = None
    schemes: dict[str, str] = field(default_factory=dict)  # a task tensor's quantizer, where not the pack's own
    # how the widths were chosen (tvq.encode.budget): "anchored" on the fixed scheme at ``anchor_bits``
    # plus upgrades, or "free" per tensor; None where not recorded (packs before either existed)
    allocation: str | None = None
    anchor_bits: int | None = None

    def get(self, key: str, base: bool = False) -> int | None:
        return (self.base_bits if base else self.bits).get(key)


@dataclass
class QuantizeOptions:
    """What to quantize and how; mirrors the paper's quantize_config.json."""

    target: Literal["task_vector", "finetuned"] = "task_vector"
    bits: int = 4
    residual: bool = False
    base_bits: int | None = None
    error_correction: bool = False
    key_rule: KeyRule = KeyRule.NDIM
    quantizer: str = "minmax"  # see tvq.quant.schemes; "minmax" is the paper's
    group_size: int = 128  # for quantizer="group"
    # per-tensor bit widths chosen by tvq.encode.budget (None: ``bits``/``base_bits`` everywhere)
    bit_plan: BitPlan | None = None
    # "auto": entropy-code each tensor's codes, and each exactly stored (raw) tensor's bytes, where
    # that makes them smaller (tvq.quant.entropy); "off": plain bit packing and raw tensors as they
    # are (the pack then reads in tvq before format version 3); "max": as "auto" with zstd's
    # optimal parser (the same format: 4-6 % smaller codes at 2 bits, ~10-30x slower to write)
    entropy: Literal["auto", "off", "max"] = "auto"

    def bits_for(self, key: str, base: bool = False) -> int:
        if self.bit_plan is not None:
            planned = self.bit_plan.get(key, base)
            if planned is not None:
                return planned
        bits = self.base_bits if base else self.bits
        if bits is None:
            raise ConfigError("base_bits is unset: validate the options first")
        return bits

    def scheme_options(self, scheme: str | None = None) -> dict[str, int]:
        return {"group_size": self.group_size} if (scheme or self.quantizer) == "group" else {}

    def scheme_for(self, key: str, base: bool = False) -> str:
        """The quantizer of ``key``'s task tensors (a bit plan may choose one per tensor), or of its RTVQ base."""
        planned = self.bit_plan.schemes.get(key) if self.bit_plan is not None and not base else None
        return planned or self.quantizer

    def quantizer_for(self, key: str, base: bool = False) -> Quantizer:
        """The scheme, at this tensor's bit width, that encodes ``key`` (or its RTVQ base)."""
        scheme = self.scheme_for(key, base)
        return quantizer(scheme, self.bits_for(key, base), self.scheme_options(scheme))

    @property
    def streams(self) -> bool:
        """The paper's min–max on task vectors: the encoders stream it (see tvq.encode.job)."""
        return self.quantizer == "minmax" and self.target != "finetuned"

    def validated(self) -> QuantizeOptions:
        """These options checked, as a copy with the RTVQ base width filled in (default b + 1)."""
        check_bits(self.bits, "bits")
        if self.entropy not in ("auto", "off", "max"):
            raise ConfigError(f"entropy={self.entropy!r} is unknown: choose auto, max or off")
        out = replace(self)
        if self.target not in ("task_vector", "finetuned"):
            raise ConfigError(f"target={self.target!r} is unknown: choose task_vector or finetuned")
        if self.residual:
            if self.target != "task_vector":
                raise ConfigError("residual (RTVQ) quantization needs target=task_vector")
            if out.base_bits is None:
                out.base_bits = min(8, self.bits + 1)
            check_bits(out.base_bits, "base_bits")
            get_scheme(self.quantizer, out.base_bits)
        elif self.error_correction:
            raise ConfigError("error_correction only applies to residual (RTVQ) quantization")
        get_scheme(self.quantizer, self.bits)
        if self.quantizer == "group" and not (isinstance(self.group_size, int) and 2 <= self.group_size <= MAX_GROUP_SIZE):
            raise ConfigError(
                f"group_size={self.group_size!r} must be an integer from 2 to {MAX_GROUP_SIZE} "
                "(the most a pack may record; a group larger than a tensor is the whole tensor)"
            )
        return out

    def method(self) -> Method:
        return Method(
            target=self.target,
            residual=self.residual,
            bits=self.bits,
            base_bits=self.base_bits if self.residual else None,
            error_correction=self.error_correction,
            key_rule=KeyRule(self.key_rule).value,
            quantizer=self.quantizer,
            group_size=self.group_size if self.quantizer == "group" else None,
            budget_bits=self.bit_plan.budget_bits if self.bit_plan is not None else None,
            allocation=self.bit_plan.allocation if self.bit_plan is not None else None,  # type: ignore[arg-type]  # checked by Method
            anchor_bits=self.bit_plan.anchor_bits if self.bit_plan is not None else None,
        )
