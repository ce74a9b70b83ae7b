"""Executors change where tensors are merged, never the bytes of the merged model."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from tvq.errors import ConfigError
from tvq.execute import LocalExecutor
from tvq.merge import load_task_vectors, merge
from tvq.merge.adamerging import AdaMergingResult

from merge_helpers import make_ckpts, make_pack, spy_block_writes

METHODS = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "scope": "tensor"}),
    ("dare_ties", {"drop_rate": 0.5}),
    ("consensus", {"base": "ties"}),
    ("lines", {}),
    ("magmax", {}),
    ("breadcrumbs", {"density": 0.5}),
    ("average", {}),
]


class PicklingExecutor:
    """A remote executor without Ray: every job is pickled and unpickled, as Ray would ship it."""

    remote = True

    def map(self, fn, jobs):
        for job in jobs:
            yield fn(pickle.loads(pickle.dumps(job)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """θ_pre, three fine-tuned checkpoints and an RTVQ pack of them."""
    ckpts = make_ckpts(tmp_path_factory.mktemp("merge-exec"))
    ckpts["pack"] = make_pack(ckpts, ckpts["dir"] / "pack", bits=3, residual=True, base_bits=4, error_correction=True)
    return ckpts


def merged_bytes(inputs: dict, out: Path, method: str, options: dict, executor=None, task: str | None = None, mixed: bool = False) -> bytes:
    fts = {"extra": inputs["ft_paths"]["t0"]} if mixed else {}
    pre, vectors = load_task_vectors(inputs["pre_path"], packs=[inputs["pack"]], finetuned=fts)
    merge(method, pre, vectors, out, options, task=task, dtype="float16", executor=executor)
    return out.read_bytes()


@pytest.mark.parametrize("method,options", METHODS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_threads_and_shipped_jobs_give_identical_bytes(inputs, tmp_path, method, options):
    serial = merged_bytes(inputs, tmp_path / "serial.safetensors", method, options)
    threads = merged_bytes(inputs, tmp_path / "threads.safetensors", method, options, LocalExecutor(threads=3))
    shipped = merged_bytes(inputs, tmp_path / "shipped.safetensors", method, options, PicklingExecutor())
    assert serial == threads == shipped


@pytest.mark.parametrize("method,options", [("task_arithmetic", {}), ("ties", {"density": 0.3, "scope": "tensor"}), ("consensus", {})],
                         ids=["task_arithmetic", "ties", "consensus"])
def test_remote_executors_stream_large_tensors_on_the_driver(inputs, tmp_path, monkeypatch, method, options):
    """With a remote executor, tensors larger than a block merge by blocks on the driver (not
    whole on a worker), the rest on the workers: the same bytes as local threads."""
    import tvq.merge.methods.ties as ties_module

    monkeypatch.setattr(ties_module, "WHOLE_TENSOR_BYTES", 0)  # TIES streams every tensor larger than a block
    local = merged_bytes(inputs, tmp_path / "local.safetensors", method, options)
    pieces = spy_block_writes(monkeypatch, 16)
    shipped = merged_bytes(inputs, tmp_path / "shipped.safetensors", method, options, PicklingExecutor())
    assert {"embed.weight", "encoder.layer.0.attn.weight"} <= set(pieces) and "encoder.layer.0.attn.bias" not in pieces
    assert shipped == local


def test_prepared_state_travels_with_the_method(inputs, tmp_path):
    """EMR's rescaler and AdaMerging's coefficients are computed on the driver only."""
    emr = merged_bytes(inputs, tmp_path / "emr.safetensors", "emr", {}, task="t1")
    assert emr == merged_bytes(inputs, tmp_path / "emr-shipped.safetensors", "emr", {}, PicklingExecutor(), task="t1")
    _, vectors = load_task_vectors(inputs["pre_path"], packs=[inputs["pack"]])
    coefficients = tmp_path / "coef.json"
    tasks = list(vectors)
    AdaMergingResult(tasks, {k: torch.tensor([0.1, 0.5, 0.9]) for k in vectors["t0"]}).save(coefficients)
    local = merged_bytes(inputs, tmp_path / "ada.safetensors", "adamerging", {"coefficients": coefficients})
    shipped = merged_bytes(inputs, tmp_path / "ada-shipped.safetensors", "adamerging", {"coefficients": coefficients}, PicklingExecutor())
    assert local == shipped


def test_mixed_packs_and_checkpoints_reopen_remotely(inputs, tmp_path):
    args = ("ties", {"density": 0.3})
    local = merged_bytes(inputs, tmp_path / "a.safetensors", *args, mixed=True)
    assert local == merged_bytes(inputs, tmp_path / "b.safetensors", *args, PicklingExecutor(), mixed=True)


def test_in_memory_inputs_cannot_go_remote(inputs, tmp_path):
    from merge_helpers import tv

    with pytest.raises(ConfigError, match="remote executor.*in memory"):
        merge("task_arithmetic", {"w": tv(w=[0.0]).materialize()["w"]}, {"a": tv(w=[1.0])}, tmp_path / "m.safetensors",
              executor=PicklingExecutor())  # fmt: skip


def test_bytes_read_counts_codes_and_pre_passes(inputs, tmp_path):
    from tvq.pack.reader import open_pack

    m = open_pack(inputs["pack"]).manifest
    codes = sum(e.stored_bytes for t in m.tasks for e in m.files[t.file].tensors.values())
    base = sum(e.stored_bytes for e in m.files[m.base_file].tensors.values())
    theta_pre = sum(t.numel() * t.element_size() for t in inputs["pre"].values())
    pre, vectors = load_task_vectors(inputs["pre_path"], packs=[inputs["pack"]])
    ta = merge("task_arithmetic", pre, vectors, tmp_path / "ta.safetensors")
    assert ta.bytes_read == theta_pre + codes + len(m.tasks) * base  # each task's τ̂ decodes the base
    pre, vectors = load_task_vectors(inputs["pre_path"], packs=[inputs["pack"]])
    ties = merge("ties", pre, vectors, tmp_path / "ties.safetensors", {"density": 0.3, "tie_rule": "keep_ties"})
    every = ta.bytes_read - theta_pre  # one pass over every τ̂
    assert ties.bytes_read == ta.bytes_read + 2 * every  # global TIES from a pack: 2 pre-passes (code histograms, the vote)
    pre, vectors = load_task_vectors(inputs["pre_path"], packs=[inputs["pack"]])
    exact = merge("ties", pre, vectors, tmp_path / "exact.safetensors", {"density": 0.3})
    # + the tie-break: one pass over the tensors holding a cut (codes tie at the cut-off), not over the model
    assert ta.bytes_read + 2 * every < exact.bytes_read <= ta.bytes_read + 3 * every




@pytest.mark.parametrize("method,options", [("task_arithmetic", {}), ("ties", {"density": 0.3})], ids=["task_arithmetic", "ties"])
def test_ray_local_cluster_writes_the_same_model(inputs, tmp_path, ray_executor, method, options):
    local = merged_bytes(inputs, tmp_path / "local.safetensors", method, options, mixed=True)
    assert local == merged_bytes(inputs, tmp_path / "ray.safetensors", method, options, ray_executor, mixed=True)
