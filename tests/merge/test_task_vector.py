"""TaskVector is a pure lazy value; apply_to streams it into a module; the merge keeps its own
record of where each task vector comes from (TaskInput), beside it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tvq.errors import CheckpointError
from tvq.io.readers import MemoryReader, as_reader
from tvq.merge import TaskInputs, load_task_vectors, merge_state_dict
from tvq.merge.source import MergeInputs, TaskSource
from tvq.vector import TaskVector

from merge_helpers import make_ckpts, make_pack, tv


def dict_applied(module: nn.Module, tau: TaskVector, scale: float) -> dict[str, torch.Tensor]:
    """The reference: θ_pre + scale·τ on the state dict, in its dtypes, then loaded into a copy."""
    sd = module.state_dict()
    out = {k: (v.float() + scale * tau[k]).to(v.dtype) if k in tau else v for k, v in sd.items()}
    reference = copy.deepcopy(module)
    reference.load_state_dict(out)
    return reference.state_dict()


def perturbed(module: nn.Module, seed: int) -> nn.Module:
    """A 'fine-tuned' copy: every float parameter and buffer moved a little (tied ones once)."""
    ft = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*ft.parameters(), *ft.buffers()]:
            if t.is_floating_point():
                t.add_((0.05 * torch.randn(t.shape, generator=g)).to(t.dtype))
    return ft


def task_vector_of(pre: nn.Module, ft: nn.Module) -> TaskVector:
    a, b = pre.state_dict(), ft.state_dict()
    return TaskVector.from_state_dict({k: b[k].float() - a[k].float() for k, v in a.items() if v.is_floating_point()}, name="ft")


def assert_same_state(a: nn.Module | dict, b: dict) -> None:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    assert sa.keys() == b.keys()
    for key in sa:
        assert sa[key].dtype == b[key].dtype, key
        assert torch.equal(sa[key], b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_apply_to_equals_the_state_dict_computation_on_a_sequential(dtype, scale):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)
    module[1].running_mean.normal_()  # a float buffer: in the task vector like a parameter
    module[1].num_batches_tracked.fill_(7)  # an int buffer: not in it, left alone
    tau = task_vector_of(module, perturbed(module, 1))
    assert "1.running_mean" in tau and "1.num_batches_tracked" not in tau
    expected = dict_applied(module, tau, scale)
    assert tau.apply_to(module, scale) is module
    assert_same_state(module, expected)
    assert int(module[1].num_batches_tracked) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_to_a_transformers_model_with_tied_weights(dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=24
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).to(dtype).eval()
    sd_keys = model.state_dict().keys()
    tied = "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"
    if all(k in sd_keys for k in tied):  # one tensor under two names: updated once, not twice
        assert model.state_dict()[tied[0]].data_ptr() == model.state_dict()[tied[1]].data_ptr()
    tau = task_vector_of(model, perturbed(model, 2))
    expected = dict_applied(model, tau, 0.7)
    tau.apply_to(model, 0.7)
    assert_same_state(model, expected)
    ids = torch.tensor([[1, 5, 7, 2]])
    reference = copy.deepcopy(model)
    reference.load_state_dict(expected)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_apply_to_streams_one_tensor_at_a_time():
    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    keys = list(module.state_dict())
    reads: list[str] = []

    def get(key: str) -> torch.Tensor:
        reads.append(key)
        return torch.ones(module.state_dict()[key].shape)

    before = {k: v.clone() for k, v in module.state_dict().items()}
    TaskVector(keys, get, "ones").apply_to(module, 2.0)
    assert reads == keys  # each τ read once, in order, never all held together
    assert all(torch.equal(module.state_dict()[k], before[k] + 2.0) for k in keys)


def test_apply_to_refuses_what_does_not_fit_before_changing_anything():
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(CheckpointError, match="'head.weight' is not a parameter or buffer"):
        tv(**{"0.weight": [[1.0] * 3] * 2, "head.weight": [1.0]}).apply_to(module)
    with pytest.raises(CheckpointError, match="'1.num_batches_tracked' is torch.int64 in the module"):
        tv(**{"1.num_batches_tracked": 1.0}).apply_to(module)
    assert_same_state(module, before)
    with pytest.raises(CheckpointError, match=r"'0.bias' has shape \[3\], the module's \[2\]"):
        tv(**{"0.bias": [1.0, 2.0, 3.0]}).apply_to(module)


def test_arithmetic_is_lazy_and_exact():
    a = tv(w=[1.0, 2.0], b=0.5)
    b = tv(w=[0.5, -1.0], b=0.25)
    c = tv(w=[1.0, 1.0])
    assert torch.equal((a + b)["w"], torch.tensor([1.5, 1.0]))
    assert torch.equal((a - b)["b"], torch.tensor(0.25))
    assert torch.equal((2 * a)["w"], torch.tensor([2.0, 4.0])) and torch.equal((a * 2)["w"], (2 * a)["w"])
    assert torch.equal((-a)["w"], torch.tensor([-1.0, -2.0]))
    assert torch.equal(sum([a, b])["w"], (a + b)["w"])
    assert a.norm() == pytest.approx((1 + 4 + 0.25) ** 0.5)
    assert a.materialize().keys() == {"w", "b"}
    with pytest.raises(CheckpointError, match="differ at tensor 'x'"):
        a + tv(w=[0.0, 0.0], b=0.0, x=1.0)
    reads: list[str] = []
    lazy = TaskVector(["w"], lambda k: reads.append(k) or torch.ones(2))
    expression = 0.5 * (lazy + c) - lazy
    assert reads == []  # nothing is read until a tensor is asked for
    assert torch.equal(expression["w"], torch.zeros(2)) and reads == ["w", "w"]


def test_from_state_dict_never_aliases_the_callers_tensors():
    w = torch.tensor([1.0, 2.0])
    a = TaskVector.from_state_dict({"w": w})
    a["w"].add_(10)
    assert torch.equal(w, torch.tensor([1.0, 2.0]))


def test_a_task_vector_carries_no_merge_hooks(tmp_path):
    ckpts = make_ckpts(tmp_path)
    pack = make_pack(ckpts, tmp_path / "pack", bits=4)
    pre, vectors = load_task_vectors(ckpts["pre_path"], packs=[pack], finetuned={"extra": ckpts["ft_paths"]["t1"]})
    assert isinstance(vectors, TaskInputs) and list(vectors) == ["t0", "t1", "t2", "extra"]
    for name, vector in vectors.items():
        assert type(vector) is TaskVector and not {"origin", "nbytes", "coded"} & set(vars(vector))
        task = vectors.input(name)
        assert task.vector is vector and task.origin is not None
    assert vectors.input("t0").origin.kind == "pack" and vectors.input("extra").origin.kind == "finetuned"
    key = "encoder.layer.0.attn.weight"
    assert vectors.input("t0").coded(key) is not None and vectors.input("extra").coded(key) is None
    assert vectors.input("extra").nbytes(key, 64) == 2 * 64 * 4  # θ_ft and θ_pre, fp32
    picked = vectors.select(["extra", "t1"])  # a subset keeps its inputs, so it still travels
    inputs = MergeInputs.of(TaskSource(pre, picked))
    assert inputs.tasks == ("extra", "t1") and len(inputs.packs) == 1 and inputs.finetuned[0][0] == "extra"
    plain = TaskSource(pre, dict(vectors))  # a plain mapping is an in-memory input: dense, fp32 bytes
    assert plain.coded(key) is None and plain.nbytes(key) == 4 * 4 * 64
    assert all(torch.equal(a, b) for a, b in zip(merge_state_dict("ties", pre, vectors).values(),
                                                   merge_state_dict("ties", pre, dict(vectors)).values(), strict=True))  # fmt: skip


def test_memory_reader_is_a_checkpoint_reader():
    sd = {"w": torch.zeros(3, 2, dtype=torch.bfloat16), "ids": torch.arange(4)}
    reader = as_reader(sd)
    assert isinstance(reader, MemoryReader) and as_reader(reader) is reader
    assert reader.keys() == ["w", "ids"] and reader.meta("w").nbytes == 12
    assert reader.float_bytes() == 6 * 4  # float tensors as fp32
    with pytest.raises(CheckpointError, match="no such tensor"):
        reader.get("missing")
