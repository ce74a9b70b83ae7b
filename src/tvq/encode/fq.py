"""FQ: the fine-tuned weights θ_t themselves quantized (the paper's baseline).

Errors are of the task vector the pack stands for: τ̂_t = θ̂_t − θ_pre against τ_t = θ_t −
θ_pre (in the inputs' precision), summed per ``STAT_CHUNK`` as packs have always recorded.
"""

from __future__ import annotations

from tvq.encode.checks import KeyInputs
from tvq.encode.job import KeyCodes
from tvq.encode.tvq import stored_codes
from tvq.quant.chunks import STAT_CHUNK, Converted, View, difference
from tvq.quant.fused import Measure, encode_chunks
from tvq.quant.schemes import Quantizer


def encode_fq(inputs: KeyInputs, q: Quantizer) -> KeyCodes:
    """Every task's θ_t of one tensor."""
    pre = Converted(inputs.pre, STAT_CHUNK)
    xs = [Converted(t, STAT_CHUNK) for t in inputs.thetas]
    taus = [difference(View(t), pre, STAT_CHUNK) for t in inputs.thetas]
    codes = encode_chunks(xs, inputs.pre.numel(), q.spec, measure=Measure(taus, minus=pre), chunk=STAT_CHUNK)
    return stored_codes(inputs, codes, q.scheme)
