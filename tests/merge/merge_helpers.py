"""Helpers for the merge tests: literal task vectors, a small model on disk, packs.

Not a conftest.py: other test modules do ``from conftest import ...`` and a second conftest
module would shadow theirs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tvq.vector import TaskVector


def tv(**tensors: list | float) -> TaskVector:
    """A task vector from literal values: tv(w=[1, 2], b=0.5)."""
    return TaskVector.from_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})


def small_model(seed: int = 0, scalar: bool = False) -> dict[str, torch.Tensor]:
    """Transformer-shaped: blocks with matrices/biases/norms, an embedding, a head, an int buffer (and a 0-d scalar)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(20, 8, generator=g)}
    for i in range(3):
        sd[f"encoder.layer.{i}.attn.weight"] = torch.randn(8, 8, generator=g) * 0.2
        sd[f"encoder.layer.{i}.attn.bias"] = torch.randn(8, generator=g) * 0.05
        sd[f"encoder.layer.{i}.norm.weight"] = 1 + torch.randn(8, generator=g) * 0.01
    sd["head.weight"] = torch.randn(4, 8, generator=g) * 0.2
    if scalar:  # tvq.quantize cannot store 0-d tensors yet (core tensor_bytes), so packs are made without it
        sd["logit_scale"] = torch.tensor(2.5)
    sd["position_ids"] = torch.arange(6)
    return sd


def finetuned(pre: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in pre.items()}


def make_pack(ckpts: dict, out: Path, **options) -> Path:
    from tvq import QuantizeOptions, quantize

    quantize(ckpts["pre_path"], ckpts["ft_paths"], out, QuantizeOptions(**options), progress=False)
    return out


def make_ckpts(tmp_path: Path) -> dict:
    """θ_pre and three fine-tuned safetensors files in ``tmp_path``."""
    pre = small_model()
    paths = {}
    save_file(pre, tmp_path / "pre.safetensors")
    fts = {f"t{i}": finetuned(pre, i) for i in range(3)}
    for name, sd in fts.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(sd, paths[name])
    return {"dir": tmp_path, "pre": pre, "fts": fts, "pre_path": tmp_path / "pre.safetensors", "ft_paths": paths}


def tiny_bert_inputs(root: Path, seed: int, files: dict[str, str]) -> dict:
    """A tiny random BERT folder built locally (no download) with extra ``files``, three
    fine-tunes a, b, c as files, and a 4-bit pack of a and b."""
    from safetensors.torch import load_file  # noqa: PLC0415 -- kept beside the transformers import
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, max_position_embeddings=12)
    pre = root / "bert"
    BertModel(config).save_pretrained(pre)
    for name, text in files.items():
        (pre / name).write_text(text)
    state = load_file(pre / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    ft = {}
    for name in ("a", "b", "c"):
        ft[name] = root / f"{name}.safetensors"
        save_file({k: (v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in state.items()}, ft[name])
    pack = make_pack({"pre_path": pre, "ft_paths": {"a": ft["a"], "b": ft["b"]}}, root / "pack", bits=4)
    return {"root": root, "pre": pre, "ft": ft, "pack": pack, "state": state}


def spy_block_writes(monkeypatch, block: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Merge by blocks of ``block`` elements from now on; the returned list fills with the names
    of the tensors the output writer receives piece by piece (merged by blocks, not whole)."""
    import tvq.merge.blocks as blocks_module
    from tvq.io.safetensors_writer import StreamingSafetensorsWriter

    monkeypatch.setattr(blocks_module, "BLOCK_ELEMENTS", block)
    pieces: list[str] = []
    original = StreamingSafetensorsWriter.add_chunks

    def spy(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        pieces.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(StreamingSafetensorsWriter, "add_chunks", spy)
    return pieces
