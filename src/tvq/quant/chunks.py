"""Chunk sources: the operands of the encoders, one cache-sized chunk at a time.

A source is a callable ``(start, end) -> chunk`` of a flat tensor, computed on demand from
the stored inputs (a bf16 checkpoint tensor, θ_t − θ_pre, the mean of the θ_t, …) and
remembering its last chunk, so a source shared by several tasks (θ_pre) is converted once
per chunk. No full-size temporary exists unless a quantizer asks for the whole tensor. The
fp32 mean of several tensors, and the squared norms of the error statistics, live here too.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from functools import cached_property

import torch

from tvq.device import divide_

CHUNK = 1 << 18  # elements: 1 MiB fp32 buffers stay in cache; smaller chunks spend more time in Python
STAT_CHUNK = 1 << 20  # elements summed per fp32 dot product by ``sq_error``


class ChunkSource:
    """Chunks of something, in ``dtype``; the last chunk is cached (shared operands cost one pass)."""

    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")  # of the inputs: chunks are computed where they live

    def __init__(self, chunk: int) -> None:
        self._chunk = chunk
        self._buf: torch.Tensor | None = None
        self._last: tuple[int, int] | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, start: int, end: int) -> torch.Tensor:
        if self._last != (start, end) or self._value is None:
            if self._buf is None or self._buf.numel() < end - start:
                self._buf = torch.empty(max(self._chunk, end - start), dtype=self.dtype, device=self.device)
            self._value = self.compute(start, end, self._buf[: end - start])
            self._last = (start, end)
        return self._value

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


Chunks = Callable[[int, int], torch.Tensor]


class View(ChunkSource):
    """A tensor's chunks as they are stored (views, no copy)."""

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__(0)
        self.flat = t.reshape(-1)
        self.dtype, self.device = t.dtype, t.device

    def __call__(self, start: int, end: int) -> torch.Tensor:
        return self.flat[start:end]


class Converted(ChunkSource):
    """A tensor's chunks in fp32: a view when it is fp32, else converted (exactly, or rounded
    once from fp64) into a buffer."""

    def __init__(self, t: torch.Tensor, chunk: int = CHUNK) -> None:
        super().__init__(chunk)
        self.flat = t.reshape(-1)
        self.device = t.device

    def __call__(self, start: int, end: int) -> torch.Tensor:
        if self.flat.dtype == torch.float32:
            return self.flat[start:end]
        return super().__call__(start, end)

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.flat[start:end])


class AsFloat32(ChunkSource):
    """Another source's chunks in fp32 (the same chunks when they already are)."""

    def __init__(self, source: ChunkSource, chunk: int = CHUNK) -> None:
        super().__init__(chunk)
        self.source = source
        self.device = source.device

    def __call__(self, start: int, end: int) -> torch.Tensor:
        if self.source.dtype == torch.float32:
            return self.source(start, end)
        return super().__call__(start, end)

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.source(start, end))


class Elementwise(ChunkSource):
    """``op(a, b)`` of two sources, in the dtype torch promotes theirs to: ``torch.sub`` of a
    bf16 θ_t (converted or viewed) and the fp32 θ_pre is exactly ``t.float() - pre32``; of an
    fp64 θ_t viewed as stored, it is fp64, as ``t - pre32`` would be. ``torch.add`` is
    commutative bit for bit."""

    def __init__(self, op: Callable[..., torch.Tensor], a: ChunkSource, b: ChunkSource, chunk: int = CHUNK) -> None:
        super().__init__(chunk)
        self.op, self.a, self.b = op, a, b
        self.dtype = torch.promote_types(a.dtype, b.dtype)
        self.device = a.device

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        return self.op(self.a(start, end), self.b(start, end), out=out)


def difference(a: ChunkSource, b: ChunkSource, chunk: int = CHUNK) -> Elementwise:
    return Elementwise(torch.sub, a, b, chunk)


class Mean(ChunkSource):
    """The fp32 mean of tensors, summed in order from zero then divided: the paper's
    get_avg_model_statedict, bit for bit (signed zeros included), whatever the input dtype.
    The mean of identical tensors (decided over the whole tensors) is the first one: in fp32
    (x+x+x)/3 != x, and for a tensor no task changed that rounding noise would cost RTVQ a
    full base and noisy offsets."""

    def __init__(self, tensors: Sequence[torch.Tensor], chunk: int = CHUNK) -> None:
        super().__init__(chunk)
        self.flats = [t.reshape(-1) for t in tensors]
        self.device = tensors[0].device

    @cached_property
    def identical(self) -> bool:
        return all(torch.equal(t, self.flats[0]) for t in self.flats[1:])

    def compute(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        if self.identical:
            return out.copy_(self.flats[0][start:end])
        out.zero_()
        for flat in self.flats:
            out += flat[start:end]  # mixed-dtype in-place add converts exactly, like t.float()
        return divide_(out, len(self.flats))


def mean_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The fp32 mean of whole tensors (``Mean`` as one chunk), shaped like them."""
    out = torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    Mean(tensors, 0).compute(0, out.numel(), out.view(-1))
    return out


def materialize(source: Chunks, n: int, chunk: int = CHUNK) -> torch.Tensor:
    """A source's whole flat fp32 tensor: the tensor itself when the source views an fp32 one."""
    if isinstance(source, Converted) and source.flat.dtype == torch.float32:
        return source.flat
    out = torch.empty(n, dtype=torch.float32, device=getattr(source, "device", None))
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        out[start:end] = source(start, end)
    return out


def sq_norm(x: torch.Tensor) -> float:
    """|x|² as a dot product in x's dtype (fp32: cheap, and all a statistic needs); an fp32
    chunk whose dot overflows (|x| beyond ~1e19) is summed again in fp64, so |x|² is finite
    exactly when x is."""
    value = float(torch.dot(x, x))
    if math.isfinite(value):
        return value
    wide = x.double()
    return float(torch.dot(wide, wide))


def sq_error(tau: torch.Tensor, *parts: torch.Tensor) -> tuple[float, float]:
    """(|Σ parts − τ|², |τ|²) of whole tensors, per ``STAT_CHUNK`` elements: fp32 dot products
    summed in double (the manifest's rel_error is a statistic). No parts means τ̂ = τ exactly."""
    flat = tau.reshape(-1)
    flats = [p.reshape(-1) for p in parts]
    buf = torch.empty(min(STAT_CHUNK, flat.numel()), dtype=torch.float32, device=flat.device) if parts else None
    err = ref = 0.0
    for start in range(0, flat.numel(), STAT_CHUNK):
        t = flat[start : start + STAT_CHUNK]
        ref += sq_norm(t)
        if buf is None:
            continue
        d = buf[: t.numel()]
        d.copy_(flats[0][start : start + STAT_CHUNK])
        for p in flats[1:]:
            d.add_(p[start : start + STAT_CHUNK])
        d.sub_(t)
        err += sq_norm(d)
    return err, ref


SCRATCH_MAX = 1 << 24  # elements, 64 MiB fp32 per thread: a 1B model's MLP matrices, a 7B model's attention ones
_scratch = threading.local()


def scratch(n: int, device: torch.device | None = None) -> torch.Tensor:
    """An fp32 work buffer of ``n`` elements, reused by this thread's next call: fresh pages
    cost a fault and a zeroing pass each time (`clear_page_erms` was ~5% of RTVQ quantize's
    CPU samples). Bigger tensors get a fresh buffer, so a thread keeps at most 64 MiB. On a
    GPU, a fresh buffer (its caching allocator reuses the memory)."""
    if n > SCRATCH_MAX or (device is not None and device.type != "cpu"):
        return torch.empty(n, dtype=torch.float32, device=device)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n]
