"""No silent NaN: the finite and overflow checks of one tensor's inputs and outputs.

Cheap checks run always (a sum, a range the encoder computes anyway); the exact ones run
only once a cheap one failed, to name the first bad file in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tvq.encode.job import BASE
from tvq.errors import CheckpointError, where
from tvq.quant.chunks import mean_of
from tvq.quant.stored import StoredTensor

FLOAT32_MAX = torch.finfo(torch.float32).max


def check_finite(t: torch.Tensor, path: Path, key: str) -> None:
    """NaN/Inf anywhere makes the fp32 sum non-finite; the sum is 15x cheaper than isfinite().
    A finite tensor whose sum overflows is told apart by the exact check."""
    cheap_ok = not t.is_floating_point() or not t.numel() or bool(torch.isfinite(t.sum(dtype=torch.float32)))
    if not cheap_ok and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{where(path, key)}: contains NaN or Inf")


def beyond_fp32(t: torch.Tensor) -> float | None:
    """The largest magnitude of fp64 ``t`` when it is finite but becomes Inf in fp32, else None.
    Conversion is monotone, so the largest magnitude converts as every element does: one
    reduction, for fp64 only (every other float dtype fits in fp32; NaN/Inf are not this)."""
    if t.dtype != torch.float64 or not t.numel():
        return None
    largest = float(t.abs().max())
    fits = math.isfinite(float(torch.tensor(largest, dtype=torch.float32)))
    return largest if math.isfinite(largest) and not fits else None


def check_fp32_range(t: torch.Tensor, path: Path, key: str) -> None:
    """fp64 values beyond fp32's range would become Inf where the encoders convert them."""
    largest = beyond_fp32(t)
    if largest is not None:
        raise CheckpointError(f"{where(path, key)}: values beyond the float32 range (|x| up to {largest:.3g})")


def check_average(avg: torch.Tensor, inputs: KeyInputs) -> None:
    """θ_avg is a sum then a division in fp32 (the paper's, bit for bit), and the sum of
    finite tensors can overflow: the averaged model must not be written with Inf. An fp32
    sum finds it (exactly: a non-finite sum is checked element by element)."""
    if bool(torch.isfinite(avg.sum(dtype=torch.float32))) or bool(torch.isfinite(avg).all()):
        return
    inputs.check()
    raise CheckpointError(f"{inputs.where_first()}: the average of the fine-tuned checkpoints overflows float32")


@dataclass
class KeyInputs:
    """One tensor's inputs, as stored, and their files: what an error message names, and
    what the exact checks of the error path read."""

    key: str
    pre: torch.Tensor
    pre_path: Path
    fts: dict[str, tuple[torch.Tensor, Path]]

    @property
    def thetas(self) -> list[torch.Tensor]:
        return [t for t, _ in self.fts.values()]

    def check(self) -> None:
        """The exact checks, run only once a cheap one failed: a NaN/Inf or fp64-only value in
        an input (θ_pre first, as the files were given), then a task vector θ_t − θ_pre that
        overflows fp32. Raises the first problem found; returns when there is none."""
        for t, path in [(self.pre, self.pre_path), *self.fts.values()]:
            check_finite(t, path, self.key)
            check_fp32_range(t, path, self.key)
        for t, path in self.fts.values():
            if t.is_floating_point() and not bool(torch.isfinite(t.float() - self.pre.float()).all()):
                raise CheckpointError(f"{where(path, self.key)}: task vector overflows float32")

    def on(self, device: torch.device) -> KeyInputs:
        """These inputs, as stored, on ``device`` (the files they name stay)."""
        return KeyInputs(self.key, self.pre.to(device), self.pre_path, {n: (t.to(device), p) for n, (t, p) in self.fts.items()})

    def where_first(self) -> str:
        path = next(iter(self.fts.values()))[1] if self.fts else self.pre_path
        return where(path, self.key)

    def blame(self, name: str, part: str, problem: str) -> CheckpointError:
        """``problem`` of ``part`` of task ``name`` (or the RTVQ base), once the inputs (and for
        the base, their average) are clean."""
        self.check()
        if name == BASE:
            check_average(mean_of(self.thetas), self)
        path = self.pre_path if name == BASE else self.fts[name][1]
        return CheckpointError(f"{where(path, self.key)}: cannot quantize the {part}: {problem}")

    def check_task(self, name: str, err_ref: tuple[float, float], exact_fp64: bool) -> None:
        """After task ``name`` is encoded: a NaN/Inf in θ_pre or θ_t, or an overflowing τ_t,
        makes |τ|² (computed anyway, and finite for every finite τ) non-finite, so the exact
        checks run only then. With ``exact_fp64``, an fp64 τ_t (fp64 inputs) must fit fp32."""
        if not math.isfinite(err_ref[1]):
            self.check()
        t, path = self.fts[name]
        if exact_fp64 and t.dtype == torch.float64 and beyond_fp32(t - self.pre.float()) is not None:
            raise CheckpointError(f"{where(path, self.key)}: task vector overflows float32")


def check_stored(stored: dict[str, StoredTensor], errors: dict[str, tuple[float, float]], inputs: KeyInputs,
                 part: dict[str, str]) -> None:  # fmt: skip
    """Nothing written may decode to NaN/Inf: every stored form's parameters (a few scalars
    each), every reconstruction error (computed anyway; non-finite when τ̂ − τ overflows),
    and RTVQ's τ̂ = β̂ + ô, summed for real only when the bounds over every code (|β̂| + |ô|)
    do not already keep it below fp32's largest value. ``part`` names what each is."""
    for name, form in stored.items():
        problem = form.decode_problem()
        if problem is not None:
            raise inputs.blame(name, part[name], problem)
    base = stored.get(BASE)
    base_largest = base.largest() if base is not None else 0.0
    for name, form in stored.items():
        if base is None or name == BASE or base_largest + form.largest() < FLOAT32_MAX:
            continue
        if not bool(torch.isfinite(base.decoded() + form.decoded()).all()):
            raise inputs.blame(name, part[name], "its reconstruction (RTVQ base + offset) overflows float32")
    for name, (err, _) in errors.items():
        if not math.isfinite(err):
            raise inputs.blame(name, part[name], "its reconstruction overflows float32")
