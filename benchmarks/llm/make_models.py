"""Generate a synthetic Llama-shaped checkpoint family for the LLM benchmark (no hub).

Writes, under ``<workdir>/models``:

* ``base/``  — a ~1.1B-parameter ``LlamaForCausalLM`` (TinyLlama's shape by default) in bf16,
  sharded safetensors + ``model.safetensors.index.json`` + ``config.json``;
* ``ft0/`` … ``ft{N-1}/`` — "fine-tuned" copies: base + small random deltas.

Weights are random but with realistic per-tensor scales (std ≈ 0.02, varying by projection
type and depth; RMSNorm weights near 1). Each fine-tune adds a Gaussian delta whose std is
``weight_std × rel`` with ``rel`` drawn per (task, tensor) from a lognormal around
``--delta-rel`` and growing mildly with depth; even-numbered tasks keep ``embed_tokens``
frozen (an untouched tensor, as in many real fine-tunes).

Everything is generated tensor by tensor from per-tensor seeds (``seed``, model, name), so the
output is reproducible and independent of order, and at most one tensor (plus its delta) is
in RAM. The safetensors headers are computed up front (all shapes are known), then the data
is streamed, so no shard is ever held in memory either.

Usage::

    python benchmarks/llm/make_models.py --workdir /work/bench_llm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "bfloat16": (torch.bfloat16, "BF16", 2),
    "float16": (torch.float16, "F16", 2),
    "float32": (torch.float32, "F32", 4),
}


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 2048
    layers: int = 22
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    max_position: int = 2048
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self, dtype: str) -> dict:
        """A real ``LlamaConfig`` (as ``config.json``), TinyLlama-1.1B's values by default."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": self.max_position,
            "mlp_bias": False,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": dtype,
            "use_cache": True,
            "vocab_size": self.vocab,
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...], float]]:
        """(name, shape, weight std) in Hugging Face's order; std 0 marks an RMSNorm weight (≈ 1)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...], float]] = [("model.embed_tokens.weight", (self.vocab, h), 0.02)]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            depth = 1.0 + 0.5 * layer / max(1, self.layers - 1)  # later layers a bit wider
            out += [
                (p + "input_layernorm.weight", (h,), 0.0),
                (p + "self_attn.q_proj.weight", (h, h), 0.025 * depth),
                (p + "self_attn.k_proj.weight", (kv, h), 0.025 * depth),
                (p + "self_attn.v_proj.weight", (kv, h), 0.015),
                (p + "self_attn.o_proj.weight", (h, h), 0.012),
                (p + "post_attention_layernorm.weight", (h,), 0.0),
                (p + "mlp.gate_proj.weight", (i, h), 0.02),
                (p + "mlp.up_proj.weight", (i, h), 0.02),
                (p + "mlp.down_proj.weight", (h, i), 0.012 * depth),
            ]
        out.append(("model.norm.weight", (h,), 0.0))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab, h), 0.02))
        return out

    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.tensors())


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def base_tensor(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """The pretrained tensor in fp32 (regenerated identically for every fine-tune)."""
    g = torch.Generator().manual_seed(_seed(seed, "base", name))
    x = torch.randn(shape, generator=g)
    if std == 0.0:  # RMSNorm weight: near 1, with a little spread
        return x.mul_(0.05).add_(1.0)
    return x.mul_(std)


def delta_rel(seed: int, task: int, name: str, layer_frac: float, median: float, sigma: float) -> float:
    """Relative delta scale of one (task, tensor): lognormal around ``median``, rising with depth."""
    g = torch.Generator().manual_seed(_seed(seed, "rel", task, name))
    z = float(torch.randn((), generator=g))
    return median * math.exp(sigma * z) * (0.7 + 0.6 * layer_frac)


def _layer_frac(name: str, layers: int) -> float:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return int(parts[2]) / max(1, layers - 1)
    return 0.5


def is_frozen(task: int, name: str) -> bool:
    """Even-numbered tasks keep the input embeddings frozen (an untouched tensor)."""
    return task % 2 == 0 and name == "model.embed_tokens.weight"


def model_tensor(
    seed: int, task: int | None, name: str, shape: tuple[int, ...], std: float, shape_cfg: LlamaShape, median: float, sigma: float
) -> torch.Tensor:
    """fp32 tensor of the base model (``task=None``) or of fine-tune ``task``."""
    x = base_tensor(seed, name, shape, std)
    if task is None or is_frozen(task, name):
        return x
    w_std = std if std > 0 else 0.05
    rel = delta_rel(seed, task, name, _layer_frac(name, shape_cfg.layers), median, sigma)
    g = torch.Generator().manual_seed(_seed(seed, "delta", task, name))
    return x.add_(torch.randn(shape, generator=g).mul_(w_std * rel))


def plan_shards(tensors: list[tuple[str, tuple[int, ...], float]], nbytes: int, shard_bytes: int) -> list[list[int]]:
    """Greedy split in order, each shard at most ``shard_bytes`` (one oversized tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for idx, (_, shape, _) in enumerate(tensors):
        b = math.prod(shape) * nbytes
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(idx)
        size += b
    return shards


def write_model(
    out: Path, shape_cfg: LlamaShape, seed: int, task: int | None, dtype: str, shard_bytes: int, median: float, sigma: float
) -> int:
    """Write one model folder; returns bytes written. Streams one tensor at a time."""
    torch_dtype, st_dtype, nbytes = DTYPES[dtype]
    tensors = shape_cfg.tensors()
    shards = plan_shards(tensors, nbytes, shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    total_size = sum(math.prod(s) * nbytes for _, s, _ in tensors)
    weight_map: dict[str, str] = {}
    written = 0
    for si, members in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for idx in members:
            name, shp, _ = tensors[idx]
            n = math.prod(shp) * nbytes
            header[name] = {"dtype": st_dtype, "shape": list(shp), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = out / (fname + ".partial")
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for idx in members:
                name, shp, std = tensors[idx]
                t = model_tensor(seed, task, name, shp, std, shape_cfg, median, sigma).to(torch_dtype).contiguous()
                fh.write(memoryview(t.view(torch.uint8).numpy()))
                del t
        tmp.replace(out / fname)
        written += 8 + len(raw) + offset
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(shape_cfg.config(dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    return written


def verify_with_transformers(path: Path, instantiate: bool) -> None:
    """AutoConfig must read the config; optionally load the whole model from disk (≈2.2 GB RAM)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    print(f"  AutoConfig: {type(cfg).__name__} model_type={cfg.model_type} layers={cfg.num_hidden_layers}", flush=True)
    if instantiate:
        from transformers import LlamaForCausalLM

        t0 = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            logits = model(torch.tensor([[1, 42, 7, 99]])).logits
        print(
            f"  LlamaForCausalLM.from_pretrained: {n / 1e9:.3f}B params, dtype {next(model.parameters()).dtype}, "
            f"logits {tuple(logits.shape)} finite={bool(torch.isfinite(logits).all())} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        del model


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench_llm"), help="models go to WORKDIR/models")
    ap.add_argument("--tasks", type=int, default=4, help="number of fine-tuned copies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=22, help="22 = TinyLlama-1.1B (1.10B params); 16 gives 0.84B")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--shard-size", default="1GB", help="largest shard, e.g. 1GB, 2GB, 500MB")
    ap.add_argument("--delta-rel", type=float, default=1e-2, help="median delta std relative to the weight std")
    ap.add_argument("--delta-sigma", type=float, default=0.5, help="lognormal spread of the relative delta scale")
    ap.add_argument("--only", nargs="*", default=None, help="write only these models (base, ft0, ft1, …)")
    ap.add_argument("--overwrite", action="store_true", help="rewrite models that already exist")
    ap.add_argument("--no-verify", action="store_true", help="skip the transformers checks")
    ap.add_argument("--instantiate", action="store_true", help="also load the base with LlamaForCausalLM.from_pretrained")
    args = ap.parse_args(argv)

    shape_cfg = LlamaShape(args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab)
    root = args.workdir / "models"
    names = ["base", *(f"ft{t}" for t in range(args.tasks))]
    wanted = args.only if args.only else names
    unknown = set(wanted) - set(names)
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}; valid: {names}")
    print(f"Llama shape {shape_cfg}: {shape_cfg.n_params() / 1e9:.3f}B params, {args.dtype}", flush=True)
    for name in names:
        if name not in wanted:
            continue
        out = root / name
        if (out / "model.safetensors.index.json").exists() and not args.overwrite:
            print(f"{out}: exists, skipped (--overwrite to rewrite)", flush=True)
            continue
        task = None if name == "base" else int(name[2:])
        t0 = time.perf_counter()
        n = write_model(out, shape_cfg, args.seed, task, args.dtype, parse_size(args.shard_size), args.delta_rel, args.delta_sigma)
        print(f"{out}: {n / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    meta = {
        "shape": shape_cfg.__dict__,
        "params": shape_cfg.n_params(),
        "dtype": args.dtype,
        "seed": args.seed,
        "tasks": args.tasks,
        "delta_rel": args.delta_rel,
        "delta_sigma": args.delta_sigma,
        "frozen": "model.embed_tokens.weight in even-numbered tasks",
    }
    (root / "generation.json").write_text(json.dumps(meta, indent=2) + "\n")
    if not args.no_verify:
        verify_with_transformers(root / "base", args.instantiate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
