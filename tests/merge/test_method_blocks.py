"""Consensus / TALL masks, MagMax, LiNeS and DARE by blocks (tvq.merge.blocks) write the bytes
of the whole-tensor merge, whatever the block size, from checkpoints and every pack kind
(Consensus with base=ties: the global trim and majority sign of the pre-pass, both tie rules;
DARE: each task's drop mask continues its generator from block to block)."""

from __future__ import annotations

import hashlib

import pytest
from test_emr_blocks import inputs, many  # noqa: F401 (fixtures)
from test_merge_blocks import WHOLE, _merged_bytes

from tvq.merge.registry import memory_note, method_class

OPTIONS = {
    "consensus": {},
    "consensus_per_task_k1": {"k": 1, "mask_lambda": {"t0": 0.2, "t1": 0.5, "t2": 0.3}, "lambda": 0.7},
    "consensus_ties": {"base": "ties"},
    "consensus_ties_keep_ties": {"base": "ties", "tie_rule": "keep_ties", "density": 0.4},
    "magmax": {},
    "lines": {},
    "lines_num_blocks": {"alpha": 0.4, "beta": 0.3, "num_blocks": 4},
    "dare": {"drop_rate": 0.5},
    "dare_average_no_rescale": {"base": "average", "drop_rate": 0.3, "rescale": False},
    "dare_per_task_weighted": {"drop_rate": {"t0": 0.0, "t1": 1.0, "t2": 0.6}, "weight": {"t0": 1.0, "t1": 0.5, "t2": 0.25}, "seed": 7},
    "dare_l1": {"drop_rate": 0.5, "rescale_mode": "l1"},  # mergekit's rescale: ‖τ‖₁ / ‖τ̃‖₁ from a pass over the blocks
    "dare_l1_per_task": {"drop_rate": {"t0": 0.0, "t1": 1.0, "t2": 0.7}, "rescale_mode": "l1", "base": "average", "seed": 3},
}


def _method(name: str) -> str:
    return name.split("_")[0]


def _options(name: str, source: str) -> dict:
    options = OPTIONS[name]
    if source != "mixed":
        return options
    return {k: (0.4 if isinstance(v, dict) else v) for k, v in options.items()}  # task names differ: one value


@pytest.mark.parametrize("name", list(OPTIONS))
def test_by_blocks_writes_the_whole_tensor_bytes(inputs, tmp_path, monkeypatch, name):  # noqa: F811
    for source, spec in inputs.items():
        options = _options(name, source)
        reference, none = _merged_bytes(monkeypatch, WHOLE, _method(name), options, tmp_path / "whole.safetensors", **spec)
        assert none == []
        for block in (1000, 96) if source == "tvq2" else (1000,):  # ragged last blocks
            got, pieces = _merged_bytes(monkeypatch, block, _method(name), options, tmp_path / f"b{block}.safetensors", **spec)
            assert "embed.weight" in pieces, (source, block)
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(reference).hexdigest(), (name, source, block)


@pytest.mark.parametrize("name", ["consensus", "consensus_ties", "magmax", "lines", "dare_average_no_rescale", "dare_l1"])
def test_nine_tasks_by_blocks(many, tmp_path, monkeypatch, name):  # noqa: F811
    """From T = 8 on, torch's own sum over tasks changes order with the size: the tasks are added in order."""
    reference, _ = _merged_bytes(monkeypatch, WHOLE, _method(name), OPTIONS[name], tmp_path / "whole.safetensors", **many)
    got, pieces = _merged_bytes(monkeypatch, 96, _method(name), OPTIONS[name], tmp_path / "blocks.safetensors", **many)
    assert "embed.weight" in pieces and got == reference


def test_help_says_they_stream():
    for name in ("consensus", "magmax", "lines", "emr", "dare"):
        assert "streams large tensors by blocks" in memory_note(method_class(name)), name
    assert "extra passes" not in memory_note(method_class("consensus"))
    assert "else merges each tensor whole" in memory_note(method_class("dare_ties"))


def test_dare_with_ties_merges_whole(inputs, tmp_path, monkeypatch):  # noqa: F811
    _, pieces = _merged_bytes(monkeypatch, 96, "dare", {"base": "ties"}, tmp_path / "out.safetensors", **inputs["tvq4"])
    assert pieces == []
