"""A torch-file output (written like the pretrained ``.pt``: tvq.io.torch_pickle_writer) takes
large tensors by blocks too (issue 19): the same bytes as the whole-tensor merge, from
fine-tuned checkpoints and packs, with tied tensors, and a piece stream of the wrong size is
a one-line error."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tvq.io.torch_pickle_writer as writer_module
import tvq.merge.blocks as blocks_module
from tvq import QuantizeOptions, quantize
from tvq.errors import CheckpointError
from tvq.io.torch_pickle_writer import write_like
from tvq.merge import load_task_vectors, merge
from tvq.merge.blocks import Chunked
from tvq.merge.methods import ties as ties_module

WHOLE = 1 << 40  # a block larger than any tensor: every tensor merged whole
BLOCK = 1000  # "embed.weight" (20480 elements) and its tied "head.weight" stream by blocks
STREAMED = {"embed.weight", "head.weight"}


def _model(seed: int) -> dict[str, torch.Tensor]:
    """A state dict with a large tensor tied to a head (one storage), small ones and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "embed.weight": torch.randn(160, 128, generator=g),
        "layers.0.weight": torch.randn(24, 20, generator=g) * 0.2,
        "layers.0.bias": torch.randn(20, generator=g) * 0.05,
        "norm.weight": 1 + torch.randn(20, generator=g) * 0.01,
        "ids": torch.arange(6),
    }
    sd["head.weight"] = sd["embed.weight"]  # tied: torch.save keeps one storage
    return sd


def _finetuned(pre: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    out = {k: (v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in pre.items() if k != "head.weight"}
    out["head.weight"] = out["embed.weight"]  # still tied
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pt_blocks")
    pre = _model(0)
    torch.save(pre, root / "pre.pt")
    fts = {}
    for i in range(3):
        fts[f"t{i}"] = root / f"t{i}.pt"
        torch.save(_finetuned(pre, i), fts[f"t{i}"])
    quantize(root / "pre.pt", fts, root / "pack", QuantizeOptions(bits=4), progress=False)
    return {
        "pre": root / "pre.pt",
        "finetuned": {"pre": root / "pre.pt", "finetuned": fts},
        "pack": {"pre": root / "pre.pt", "packs": [root / "pack"]},
    }


@pytest.fixture(autouse=True)
def stream_every_large_tensor(monkeypatch):
    """Here tensors are small: TIES streams every one larger than a block, whatever its working set."""
    monkeypatch.setattr(ties_module, "WHOLE_TENSOR_BYTES", 0)


def _spy_chunked(monkeypatch) -> dict[str, int]:
    """Tensor name -> pieces, for each tensor the torch-file writer receives by pieces."""
    pieces: dict[str, int] = {}
    original = writer_module._write_chunked

    def spy(archive, fd, ref, tensor, name, digest):  # type: ignore[no-untyped-def]
        key = name.split("tensor '", 1)[1].rstrip("'")
        pieces[key] = 0

        def counted(chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
            for chunk in chunks:
                pieces[key] += 1
                yield chunk

        return original(archive, fd, ref, Chunked(tensor.shape, tensor.dtype, counted(tensor.chunks)), name, digest)

    monkeypatch.setattr(writer_module, "_write_chunked", spy)
    return pieces


def _merged(monkeypatch, block: int, method: str, options: dict, out: Path, *, pre, packs=(), finetuned=None) -> tuple[bytes, dict[str, int]]:
    monkeypatch.setattr(blocks_module, "BLOCK_ELEMENTS", block)
    pieces = _spy_chunked(monkeypatch)
    reader, vectors = load_task_vectors(pre, packs=list(packs), finetuned=finetuned)
    merge(method, reader, vectors, out, options, overwrite=True)
    return out.read_bytes(), pieces


# Tied tensors merge once (tvq.io.tied), so the exact rule's tie-break, seeded with a tensor's
# name, cannot give them two values: from 4-bit codes (many entries tied at the cut-off) too.
CASES = [
    ("finetuned", "task_arithmetic", {"lambda": 0.7}),
    ("finetuned", "ties", {"scope": "tensor"}),
    ("finetuned", "ties", {"tie_rule": "keep_ties"}),
    ("finetuned", "ties", {}),
    ("pack", "task_arithmetic", {"lambda": 0.7}),
    ("pack", "ties", {"scope": "tensor", "tie_rule": "keep_ties"}),
    ("pack", "ties", {"tie_rule": "keep_ties"}),
    ("pack", "ties", {"scope": "tensor"}),
    ("pack", "ties", {}),
]


IDS = [f"{s}-{m}-{o.get('scope', 'global')}-{o.get('tie_rule', 'exact')}" for s, m, o in CASES]


@pytest.mark.parametrize(("source", "method", "options"), CASES, ids=IDS)
def test_a_pt_output_by_blocks_has_the_whole_merge_bytes(inputs, tmp_path, monkeypatch, source, method, options):
    spec = inputs[source]
    whole, none = _merged(monkeypatch, WHOLE, method, options, tmp_path / "whole.pt", **spec)
    assert none == {}  # the old path: every tensor whole
    got, pieces = _merged(monkeypatch, BLOCK, method, options, tmp_path / "blocks.pt", **spec)
    assert set(pieces) == STREAMED and all(n >= 20 for n in pieces.values()), pieces  # 20480 elements by blocks of 1000 (rounded to 1008)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(whole).hexdigest()
    _merged(monkeypatch, BLOCK, method, options, tmp_path / "blocks.safetensors", **spec)
    expected = load_file(tmp_path / "blocks.safetensors")
    loaded = torch.load(tmp_path / "blocks.pt", weights_only=True)
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert not torch.equal(loaded["embed.weight"], torch.load(inputs["pre"], weights_only=True)["embed.weight"])  # merged, not copied
    assert loaded["head.weight"].untyped_storage().data_ptr() == loaded["embed.weight"].untyped_storage().data_ptr()  # still tied


def _template(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torch file with a tied pair ("a", "b": one storage), a strided view ("t") and a plain tensor ("c")."""
    a = torch.randn(6, 7)
    sd = {"a": a, "b": a, "t": torch.randn(5, 4).t(), "c": torch.randn(9)}
    torch.save(sd, tmp_path / "in.pt")
    new = {"a": torch.randn(6, 7), "t": torch.randn(4, 5), "c": torch.randn(9)}
    new["b"] = new["a"]
    return tmp_path / "in.pt", new


def _chunked(tensor: torch.Tensor, step: int = 5) -> Chunked:
    flat = tensor.contiguous().reshape(-1)
    return Chunked(tuple(tensor.shape), tensor.dtype, iter([flat[i : i + step].clone() for i in range(0, flat.numel(), step)]))


def test_write_like_takes_pieces_tied_strided_and_dense_alike(tmp_path):
    template, new = _template(tmp_path)
    write_like(template, new.items(), tmp_path / "whole.pt")
    mixed = [("a", new["a"]), ("b", _chunked(new["b"])), ("t", _chunked(new["t"])), ("c", _chunked(new["c"], 4))]
    write_like(template, mixed, tmp_path / "pieces.pt")  # "b" by pieces, tied to a whole "a": their digests agree
    assert (tmp_path / "pieces.pt").read_bytes() == (tmp_path / "whole.pt").read_bytes()
    write_like(template, [(k, _chunked(v)) for k, v in new.items()], tmp_path / "all.pt")
    assert (tmp_path / "all.pt").read_bytes() == (tmp_path / "whole.pt").read_bytes()
    loaded = torch.load(tmp_path / "all.pt", weights_only=True)
    for key, value in new.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()


def test_a_tie_given_other_values_by_pieces_is_refused(tmp_path):
    template, new = _template(tmp_path)
    other = [("a", new["a"]), ("b", _chunked(new["a"] + 1)), ("t", new["t"]), ("c", new["c"])]
    with pytest.raises(CheckpointError, match="tensor 'a': shares its storage with another tensor"):
        write_like(template, other, tmp_path / "bad.pt")


@pytest.mark.parametrize("key", ["c", "t"], ids=["dense", "strided"])
def test_pieces_of_the_wrong_size_or_dtype_are_one_line_errors(tmp_path, key):
    template, new = _template(tmp_path)
    value = new[key]
    flat, n = value.contiguous().reshape(-1), value.numel()
    bad = {
        "short": ([flat[:-1]], rf"tensor '{key}': pieces of {n - 1} elements, the tensor has {n}$"),
        "long": ([flat, flat[:1]], rf"tensor '{key}': pieces of more than the tensor's {n} elements$"),
        "dtype": ([flat.double()], rf"tensor '{key}': a piece of float64, expected float32$"),
    }
    for name, (pieces, message) in bad.items():
        chunked = Chunked(tuple(value.shape), value.dtype, iter(pieces))
        items = [(k, chunked if k == key else v) for k, v in new.items()]
        with pytest.raises(CheckpointError, match=message) as info:
            write_like(template, items, tmp_path / f"{name}.pt")
        assert "\n" not in str(info.value) and str(template) in str(info.value), name
