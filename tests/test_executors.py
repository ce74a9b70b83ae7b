"""Executors change where tensors are encoded, never the bytes that are written."""

from __future__ import annotations

import pytest

from tvq import QuantizeOptions, quantize
from tvq.errors import CheckpointError, ConfigError
from tvq.execute import LocalExecutor, make_executor


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


OPTS = QuantizeOptions(bits=3, residual=True, base_bits=4, error_correction=True)


def test_threads_give_identical_packs(tiny):
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "a", OPTS, progress=False)
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "b", OPTS, progress=False, executor=LocalExecutor(threads=3))
    assert _files(tiny["dir"] / "a") == _files(tiny["dir"] / "b")


def test_unknown_executor():
    with pytest.raises(ConfigError, match="valid: local, ray"):
        make_executor("dask")




def test_ray_local_cluster_writes_the_same_pack(tiny, ray_executor):
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "local", OPTS, progress=False)
    quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "ray", OPTS, progress=False, executor=ray_executor)
    assert _files(tiny["dir"] / "local") == _files(tiny["dir"] / "ray")


def test_ray_worker_errors_are_one_line_tvq_errors(tiny, ray_executor):
    import torch
    from safetensors.torch import save_file

    sd = dict(tiny["fts"]["task2"])
    sd["encoder.layer.0.mlp.weight"] = torch.full((24, 16), float("nan"))
    save_file(sd, tiny["ft_paths"]["task2"])
    with pytest.raises(CheckpointError, match="task2.safetensors.*encoder.layer.0.mlp.weight.*NaN"):
        quantize(tiny["pre_path"], tiny["ft_paths"], tiny["dir"] / "ray", OPTS, progress=False, executor=ray_executor)


def test_threaded_map_leaves_torch_threads_as_they_were():
    """Workers run torch single-threaded; torch's setting is process-wide, so it is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert list(LocalExecutor(threads=2).map(lambda x: torch.get_num_threads() + 0 * x, range(4))) == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
