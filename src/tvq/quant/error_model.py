"""The squared error of every bit width and clip factor of a tensor, from one pass over it.

Bit allocation needs, per tensor, the error of each candidate grid: up to 7 widths × 40 clip
factors (MSE-clipped grids) × every task and RTVQ base width. Quantizing the tensor for each
costs a pass per candidate. Instead one pass counts the values in the bins of a fine uniform
grid over [min, max] (on an evenly spaced sample of ``SAMPLE`` values for larger tensors); with
each bin's values taken as spread evenly over it, a grid's error is then exact, up to O(bin
width²), for every bin that lies inside one quantization cell,

    Σ_code (n·x̂² − 2·x̂·Σx + Σx²),   x̂ = the code's reconstruction, sums over its bins,

and off only in the bins that straddle a decision boundary (assigned whole by their centre).
With ``BINS`` = 2^16 bins a grid cell spans at least 25 bins (8 bits, clip factor 0.1), so the
estimate is within a fraction of a percent of the true error; with prefix sums over the bins a
grid costs O(2^bits), so every width and clip factor of a tensor costs less than one pass.
The affine grids are those of ``tvq.quant.affine`` (``affine_from_range``), min–max and the
MSE search's clip factors alike.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tvq.errors import EncodeError
from tvq.quant import histogram
from tvq.quant.affine import NOT_FINITE, affine_from_range
from tvq.quant.chunks import CHUNK

BINS = 1 << 16
SAMPLE = 1 << 22  # values histogrammed per tensor at most (an evenly spaced sample beyond)


@dataclass(frozen=True)
class ValueStats:
    """Sufficient statistics of a tensor's values for the error of any affine grid on them."""

    lo: float
    hi: float
    numel: int  # values in the tensor
    width: float  # of a bin
    count: torch.Tensor  # [bins + 1] float64 prefix sums: values in bins < i
    total: torch.Tensor  # prefix sums of Σx (from the bins' centres)
    squares: torch.Tensor  # prefix sums of Σx²

    @classmethod
    def of(cls, x: torch.Tensor, bins: int = BINS, sample: int = SAMPLE) -> ValueStats:
        """The range of all of ``x`` (finite values), and the histogram of an evenly spaced
        sample of at most ``sample`` values (all of them when fewer), scaled to the whole."""
        flat = x.reshape(-1)
        lo, hi = (float(v) for v in torch.aminmax(flat)) if flat.numel() else (0.0, 0.0)
        _check_range(lo, hi)
        step = sample_step(flat.numel(), sample)
        return cls.of_sample(lo, hi, flat.numel(), [flat if step == 1 else flat[::step]], bins)

    @classmethod
    def streamed(cls, chunks: Callable[[int, int], torch.Tensor], numel: int, bins: int = BINS, sample: int = SAMPLE,
                 chunk: int = CHUNK) -> ValueStats:  # fmt: skip
        """``of`` of a tensor never held whole, the same numbers bit for bit: ``chunks(start,
        end)`` gives its flat values in fp32 a chunk at a time. One pass takes the range and
        keeps the evenly spaced sample (at most ``sample`` fp32 values); a tensor of at most
        ``sample`` values is histogrammed whole, from a second pass over its chunks."""
        return cls.streamed_all([chunks], numel, bins, sample, chunk)[0]

    @classmethod
    def streamed_all(cls, sources: Sequence[Callable[[int, int], torch.Tensor]], numel: int, bins: int = BINS,
                     sample: int = SAMPLE, chunk: int = CHUNK) -> list[ValueStats]:  # fmt: skip
        """``streamed`` of several tensors of ``numel`` values in one pass over the chunks, each
        chunk of every source in turn: sources that share an operand (θ_pre, a chunk source that
        keeps its last chunk) convert it once per chunk, not once per source. The same numbers."""
        step = sample_step(numel, sample)
        kept = [work_buffer(f"kept{i}", len(range(0, numel, step)), torch.float32) for i in range(len(sources))] if step > 1 else None
        lo = [0.0] * len(sources)
        hi = [0.0] * len(sources)
        for start in range(0, numel, chunk):
            end = min(start + chunk, numel)
            first = -start % step
            for i, chunks in enumerate(sources):
                values = chunks(start, end)
                c_lo, c_hi = (float(v) for v in torch.aminmax(values))
                _check_range(c_lo, c_hi)
                lo[i], hi[i] = (c_lo, c_hi) if start == 0 else (min(lo[i], c_lo), max(hi[i], c_hi))
                if kept is not None:  # the values at 0, step, 2·step, … of the whole tensor
                    picked = values[first::step]
                    kept[i][(start + first) // step :][: picked.numel()] = picked
        out = []
        for i, chunks in enumerate(sources):
            _check_range(lo[i], hi[i])
            parts = [kept[i]] if kept is not None else (chunks(s, min(s + chunk, numel)) for s in range(0, numel, chunk))
            out.append(cls.of_sample(lo[i], hi[i], numel, parts, bins))
        return out

    @classmethod
    def of_sample(cls, lo: float, hi: float, numel: int, parts: Iterable[torch.Tensor], bins: int = BINS) -> ValueStats:
        """From the range of a tensor of ``numel`` values and its sample, given in parts: the
        histogram of the sample (integer counts, so summed over parts in any split), scaled."""
        width = (hi - lo) / bins if hi > lo else 1.0
        counts, sampled = bin_counts(parts, lo, width, bins)
        return cls.of_counts(lo, hi, numel, width, counts, sampled)

    @classmethod
    def of_counts(cls, lo: float, hi: float, numel: int, width: float, counts: torch.Tensor, sampled: int) -> ValueStats:
        """From the range of a tensor of ``numel`` values and the bin counts of ``sampled`` of them, scaled."""
        # the three prefix sums in one [3, bins + 1] tensor, each row from 0 (the same values as summing
        # each alone: one cumsum call instead of three, and no concatenation)
        out = torch.empty(3, counts.numel() + 1, dtype=torch.float64)
        out[:, 0] = 0
        count, total, squares = out[0, 1:], out[1, 1:], out[2, 1:]
        count.copy_(counts).mul_(numel / max(sampled, 1))
        # values spread evenly inside a bin: Σx = n·c and Σx² = n·(c² + w²/12) (exact as w → 0)
        centre = torch.arange(counts.numel(), dtype=torch.float64).add_(0.5).mul_(width).add_(lo)
        torch.mul(count, centre, out=total)
        torch.mul(count, centre.mul_(centre).add_(width * width / 12), out=squares)
        out[:, 1:].cumsum_(1)
        return cls(lo, hi, numel, width, out[0], out[1], out[2])

    @property
    def constant(self) -> bool:
        return self.lo == self.hi

    def affine_errors(self, bits: int, clips: Sequence[float] = (1.0,)) -> list[float]:
        """Estimated Σ(x̂ − x)² of the asymmetric grid on [c·min, c·max] for each clip factor c
        (infinity where the clipped range is empty, as the MSE search skips it)."""
        return [g[0] for g in self.grids(bits, clips)]

    def grids(self, bits: int, clips: Sequence[float] = (1.0,)) -> list[tuple[float, float, float]]:
        """Per clip factor: (estimated squared error, order-0 entropy of all the codes in bits,
        share of the most frequent code)."""
        if self.constant:
            return [(0.0, 0.0, 1.0) for _ in clips]
        return _grids_all([self], bits, clips)[0]

    @staticmethod
    def best_of_all(stats: Sequence[ValueStats], bits: int, clips: Sequence[float] = (1.0,)) -> list[tuple[float, float, float]]:
        """``[s.best(bits, clips) for s in stats]``, the same numbers, computed for all of them at
        once (the analysis prices thousands of tensors × tasks × widths: per call, the fixed cost
        of a dozen small torch ops was most of its Python time)."""
        plain = [s for s in stats if not s.constant]
        stacked = len({s.count.numel() for s in plain}) == 1  # as many bins (and some not constant)
        found = iter(_grids_all(plain, bits, clips) if stacked else [s.grids(bits, clips) for s in plain])
        return [(0.0, 0.0, 1.0) if s.constant else _least(next(found)) for s in stats]

    def best_clip(self, bits: int, clips: Sequence[float]) -> float:
        """The clip factor of least estimated error (the first of equals, as the MSE search)."""
        return clips[self._best(bits, clips)[0]]

    def best(self, bits: int, clips: Sequence[float] = (1.0,)) -> tuple[float, float, float]:
        """(error, code entropy in bits, most frequent code's share) of the least-error clip
        factor: what the encoder keeps."""
        return self._best(bits, clips)[1]

    def _best(self, bits: int, clips: Sequence[float]) -> tuple[int, tuple[float, float, float]]:
        grids = self.grids(bits, clips)
        i = _least_at(grids)
        return i, grids[i]

    def error(self, bits: int, clips: Sequence[float] = (1.0,)) -> float:
        """The least estimated error over ``clips`` (one clip factor: min–max)."""
        return min(self.affine_errors(bits, clips))


def _least_at(grids: list[tuple[float, float, float]]) -> int:
    """The clip factor of least error (the first of equals, as the MSE search)."""
    return min(range(len(grids)), key=lambda j: grids[j][0])


def _least(grids: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return grids[_least_at(grids)]


def _grids_all(stats: Sequence[ValueStats], bits: int, clips: Sequence[float]) -> list[list[tuple[float, float, float]]]:
    """``ValueStats.grids`` of non-constant statistics with as many bins, stacked ``[tensor, clip,
    code]``: each element by the same float64 operations whatever the stack, each row reduced alone."""
    qmax = 2**bits - 1
    bins = stats[0].count.numel() - 1
    lo = torch.tensor([s.lo for s in stats], dtype=torch.float64)[:, None]
    hi = torch.tensor([s.hi for s in stats], dtype=torch.float64)[:, None]
    width = torch.tensor([s.width for s in stats], dtype=torch.float64)[:, None, None]
    factor = torch.tensor(list(clips), dtype=torch.float64)[None, :]
    a_lo, a_hi = factor * lo, factor * hi  # [tensors, clips]
    empty = a_hi <= a_lo
    scale, zero_point = affine_from_range(a_lo, torch.where(empty, a_lo + 1, a_hi), bits)
    bad = ~empty & ~(torch.isfinite(scale) & (scale > 0) & torch.isfinite(zero_point))
    if bool(bad.any()):  # as the quantizer would refuse this grid (tvq.quant.affine._affine); the first such tensor
        first = stats[int(bad.any(dim=1).nonzero()[0, 0])]
        raise EncodeError(f"its range [{first.lo:.7g}, {first.hi:.7g}] cannot be quantized in float32 at {bits} bits")
    scale, zero_point = scale[:, :, None], zero_point[:, :, None]
    codes = torch.arange(qmax + 1, dtype=torch.float64)
    rec = (codes - zero_point) / scale  # [tensors, clips, levels]: each code's reconstruction
    # a bin goes to the code its centre rounds to: code k holds the bins from edge[k] to edge[k + 1]
    boundary = (codes[:-1] + 0.5 - zero_point) / scale
    first_bin = torch.ceil((boundary - lo[:, :, None]) / width - 0.5).clamp(0, bins).to(torch.int64)
    S, C = len(stats), len(clips)
    edge = torch.cat([first_bin.new_zeros(S, C, 1), first_bin, first_bin.new_full((S, C, 1), bins)], dim=2)

    def per_code(name: str) -> torch.Tensor:
        at = torch.stack([getattr(s, name)[e] for s, e in zip(stats, edge, strict=True)])
        return at[:, :, 1:] - at[:, :, :-1]

    n = per_code("count")
    err = (n * rec * rec - 2 * rec * per_code("total") + per_code("squares")).sum(dim=2).clamp_min(0)
    total = n.sum(dim=2, keepdim=True).clamp_min(1e-300)
    entropy = -(n * torch.log2(torch.where(n > 0, n / total, torch.ones_like(n)))).sum(dim=2)
    p_max = (n.max(dim=2).values / total[:, :, 0]).clamp(0, 1)
    return [[(float("inf"), 0.0, 1.0) if e else (float(v), float(h), float(p)) for v, h, p, e in zip(*row, strict=True)]
            for row in zip(err.tolist(), entropy.tolist(), p_max.tolist(), empty.tolist(), strict=True)]  # fmt: skip


INDEX_BLOCK = 1 << 20  # bin indices counted per bincount (int32: 4 MiB per thread)
_buffers = threading.local()


def work_buffer(name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A work buffer of ``n`` elements, this thread's own, reused by its next call: fresh pages cost
    a fault and a zeroing pass each (the analysis summarises thousands of tensors), as
    ``tvq.quant.chunks.scratch`` says. Valid until this thread asks for ``name`` again."""
    buf = getattr(_buffers, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        setattr(_buffers, name, buf)
    return buf[:n]


def release_work_buffers() -> None:
    """Drop this thread's work buffers (a pool's threads drop theirs when they end)."""
    _buffers.__dict__.clear()


def bin_counts(parts: Iterable[torch.Tensor], lo: float, width: float, bins: int) -> tuple[torch.Tensor, int]:
    """How many values of ``parts`` fall in each of ``bins`` bins of ``width`` from ``lo`` (int64),
    and how many values there were: the bin of x is ⌊(float32(x) − lo) · (1 / width)⌋ in fp32,
    clamped to the bins. A chunk at a time in reused buffers, indices in int32 counted a block
    at a time across parts: the same counts as the whole-tensor expression
    ``((x.float() − lo) * (1 / width)).to(int64).clamp(0, bins − 1)`` (clamping before truncating
    toward zero changes no index), about 3x faster (its three full-size temporaries were most of
    the budget analysis' time); compiled where numba is installed (``tvq.quant.histogram.counter``)."""
    inv = 1.0 / width
    counts = torch.zeros(bins, dtype=torch.int64)
    index = work_buffer("index", INDEX_BLOCK, torch.int32)
    scaled = work_buffer("scaled", CHUNK, torch.float32)
    filled = sampled = 0
    for part in parts:
        flat = part.reshape(-1)
        n = flat.numel()
        sampled += n
        kernel = histogram.counter(n)
        if kernel is not None:  # compiled: one fused loop, the same counts
            lo32, inv32, top = np.float32(lo), np.float32(inv), np.float32(bins - 1)
            if flat.dtype == torch.float32 and flat.is_contiguous():
                kernel(flat.numpy(), lo32, inv32, top, counts.numpy())
                continue
            for start in range(0, n, CHUNK):
                x = scaled[: min(CHUNK, n - start)]
                kernel(x.copy_(flat[start : start + x.numel()]).numpy(), lo32, inv32, top, counts.numpy())
            continue
        start = 0
        while start < n:
            end = min(start + CHUNK, n, start + INDEX_BLOCK - filled)
            x = scaled[: end - start]
            x.copy_(flat[start:end])  # fp32 (rounded once from fp64, as .float())
            x.sub_(lo).mul_(inv).clamp_(0, bins - 1)
            index[filled : filled + end - start].copy_(x)
            filled += end - start
            start = end
            if filled == INDEX_BLOCK:
                counts += torch.bincount(index, minlength=bins)
                filled = 0
    if filled:
        counts += torch.bincount(index[:filled], minlength=bins)
    return counts, sampled


def compiled_stats(theta: torch.Tensor, pre: torch.Tensor | None, bins: int = BINS, sample: int = SAMPLE) -> ValueStats | None:
    """``ValueStats.of`` of θ.float() − θ_pre.float() (or of θ.float(), no ``pre``), the same
    numbers, from two compiled passes over the stored inputs (``tvq.quant.histogram``: the range,
    then the sample's bins, x formed in registers, never stored). None where they do not apply:
    numba missing, inputs not both bf16 or both fp32 on the CPU, or values torch's path must
    judge (non-finite ones, a zero minimum or maximum)."""
    numel = theta.numel()
    kernels = histogram.input_kernels(numel)
    same = pre is None or (pre.dtype == theta.dtype and pre.device == theta.device)
    if kernels is None or theta.dtype not in (torch.bfloat16, torch.float32) or theta.device.type != "cpu" or not same:
        return None
    ranger, count = kernels
    bf16 = theta.dtype == torch.bfloat16
    t = kernel_elements(theta)
    p = t if pre is None else kernel_elements(pre)
    lo, hi, plain = ranger(t, p, bf16, pre is not None)
    if not plain:
        return None
    _check_range(lo, hi)
    step = sample_step(numel, sample)
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = torch.zeros(bins, dtype=torch.int64)
    count(t, p, bf16, pre is not None, step, np.float32(lo), np.float32(1.0 / width), np.float32(bins - 1), counts.numpy())
    return ValueStats.of_counts(lo, hi, numel, width, counts, len(range(0, numel, step)))


def kernel_elements(t: torch.Tensor) -> np.ndarray:
    """A bf16 or fp32 CPU tensor's flat elements for the kernels: bf16 as its uint16 bits."""
    flat = t.reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()


def sample_step(numel: int, sample: int = SAMPLE) -> int:
    """The stride of the evenly spaced sample of ``ValueStats.of``: 1 (all values) up to ``sample``."""
    return 1 if numel <= sample else numel // sample


def _check_range(lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(hi - lo)):
        raise EncodeError(NOT_FINITE)  # as the quantizers say it


def mse_clips(grid: int) -> list[float]:
    """The clip factors the MSE range search tries (``tvq.quant.affine``): 1.0 down to 0.1."""
    return [1.0 - 0.9 * i / grid for i in range(grid)]
