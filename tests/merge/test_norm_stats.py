"""Running statistics are statistics, not task-vector entries (issue 14): detection, packs,
every --norm-stats choice, re-estimation on data, and a BN model where it matters."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from bn_toy import TASKS, build, load
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typer.testing import CliRunner

from tvq import QuantizeOptions, TaskVector, open_pack, quantize
from tvq.cli import app
from tvq.encode.budget import quantize_within_budget
from tvq.errors import ConfigError
from tvq.execute import make_executor
from tvq.io.readers import TensorMeta
from tvq.merge import load_task_vectors, merge, merge_state_dict, open_emr
from tvq.merge.engine import emr_task_model
from tvq.merge.source import MergeInputs, TaskSource
from tvq.merge.statistics import DEFAULT_NORM_STATS, NormStatsWarning
from tvq.normstats import module_statistic_keys, norm_layers, reestimate_norm_stats, statistic_keys
from tvq.quant import selection
from tvq.quant.selection import KeyRule, TensorRole, is_statistic, tensor_role
from tvq.report import pack_summary

from merge_helpers import small_model

STATS = ("running_mean", "running_var")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build(tmp_path_factory.mktemp("bn_toy"))


def _tvs(toy) -> dict[str, TaskVector]:
    return {t: TaskVector.from_checkpoints(toy.pre, toy.fts[t], name=t) for t in TASKS}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormStatsWarning)
        return fn(*args, **kwargs)


# -- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["bn1.running_mean", "features.3.1.running_var", "bn.num_batches_tracked", "block/bn/moving_mean",
     "bn.moving_variance", "bn.moving_var", "white.running_std", "batch_stats.BatchNorm_0.mean", "running_var"],
)  # fmt: skip
def test_statistics_by_name(key):
    assert is_statistic(key)


@pytest.mark.parametrize("key", ["bn1.weight", "bn1.bias", "encoder.layer.0.attn.weight", "running_mean_proj.weight", "stats.mean", "mean"])
def test_weights_are_not_statistics(key):
    assert not is_statistic(key)


class _OddNorm(_BatchNorm):
    """A BatchNorm subclass (as timm's BatchNormAct2d) with an extra, oddly named buffer."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.register_buffer("ema_scale", torch.ones(n))
        self.register_buffer("scratch", torch.zeros(n), persistent=False)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass


def test_statistics_by_module_structure():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.InstanceNorm2d(4, track_running_stats=True), nn.InstanceNorm2d(4),
        nn.GroupNorm(2, 4), nn.LayerNorm(4), _OddNorm(4), nn.SyncBatchNorm(4), nn.BatchNorm1d(4, track_running_stats=False),
    )  # fmt: skip
    keys = module_statistic_keys(model)
    assert keys == [f"{i}.{b}" for i in (1, 2) for b in ("running_mean", "running_var", "num_batches_tracked")] + [
        "6.running_mean", "6.running_var", "6.num_batches_tracked", "6.ema_scale",
        "7.running_mean", "7.running_var", "7.num_batches_tracked",
    ]  # fmt: skip
    assert set(norm_layers(model)) == {"1", "2", "6", "7"}
    # names alone miss ema_scale; with the module it is found, and nothing else is added
    state = model.state_dict()
    assert "6.ema_scale" not in statistic_keys(state)
    assert statistic_keys(state, model) == keys
    assert all(k in keys for k in statistic_keys(state))


def test_roles_keep_statistics_exact_under_every_key_rule():
    f = TensorMeta((8,), torch.float32)
    i = TensorMeta((), torch.int64)
    for rule in KeyRule:
        assert tensor_role("bn.running_var", f, rule) == TensorRole.STATISTIC
        assert tensor_role("bn.num_batches_tracked", i, rule) == TensorRole.SKIP
    assert TensorRole.STATISTIC.exact and TensorRole.KEEP.exact and not TensorRole.QUANTIZE.exact
    assert tensor_role("bn.weight", f) == TensorRole.KEEP
    assert tensor_role("bn.weight", f, KeyRule.PAPER) == TensorRole.QUANTIZE


# -- packs ----------------------------------------------------------------------------------


def test_pack_stores_each_tasks_statistics_exactly(toy, tmp_path):
    quantize(toy.pre_path, toy.ft_paths, tmp_path / "p", QuantizeOptions(bits=2), progress=False)
    pack = open_pack(tmp_path / "p")
    entries = pack.manifest.files[pack.manifest.tasks[0].file].tensors
    for task in TASKS:
        tv = pack.task_vector(task)
        for key in [k for k in toy.pre if k.endswith(STATS)]:
            assert entries[key].kind == "raw"
            assert torch.equal(tv[key], toy.fts[task][key] - toy.pre[key])
    assert "bn1.num_batches_tracked" in pack.manifest.skipped


def test_bn_pack_files_are_what_they_were_before_statistics_had_a_role(toy, tmp_path, monkeypatch):
    """The STATISTIC role stores exactly what KEEP stored: with the name rule switched off
    (tvq before issue 14) every tensor file is the same, byte for byte. (Packs of models
    without statistics: tests/test_pack.py compares them with packs kept from tvq 0.1.0.)"""
    quantize(toy.pre_path, toy.ft_paths, tmp_path / "now", QuantizeOptions(bits=3, residual=True, base_bits=3), progress=False)
    monkeypatch.setattr(selection, "is_statistic", lambda key: False)
    quantize(toy.pre_path, toy.ft_paths, tmp_path / "before", QuantizeOptions(bits=3, residual=True, base_bits=3), progress=False)
    now, before = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("now", "before"))
    assert now["files"] == before["files"]  # sizes and sha256 of every file, every entry
    for rel in now["files"]:
        assert (tmp_path / "now" / rel).read_bytes() == (tmp_path / "before" / rel).read_bytes()


def test_info_error_over_quantized_tensors_and_over_all(toy, tmp_path):
    """The BN statistics' deltas dwarf the weights' (running_var moves by ~10x the input
    variance): over all tensors the error is diluted; over quantized ones it is the weights'."""
    quantize(toy.pre_path, toy.ft_paths, tmp_path / "p", QuantizeOptions(bits=2), progress=False)
    pack = open_pack(tmp_path / "p")
    summary = pack_summary(tmp_path / "p")
    quantized = [k for k, e in pack.manifest.files[pack.manifest.tasks[0].file].tensors.items() if e.kind != "raw"]
    for t in summary["tasks"]:
        tv = pack.task_vector(t["name"])
        err = sum(float((tv[k] - (toy.fts[t["name"]][k] - toy.pre[k])).double().pow(2).sum()) for k in quantized)
        ref_q = sum(float((toy.fts[t["name"]][k] - toy.pre[k]).double().pow(2).sum()) for k in quantized)
        assert t["rel_error_quantized"] == pytest.approx((err / ref_q) ** 0.5, rel=1e-4)
        assert t["rel_error_quantized"] > 1.5 * t["rel_error"]  # diluted by the exactly stored statistics
    assert max(t["rel_error_quantized"] / t["rel_error"] for t in summary["tasks"]) > 3
    assert set(summary["statistics"]) == {k for k in toy.pre if k.endswith(STATS)}
    result = CliRunner().invoke(app, ["info", str(tmp_path / "p")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "quantized" in result.output and "running statistics: 6 tensors" in result.output
    row = next(line for line in result.output.splitlines() if "bright" in line)
    errors = [float(cell) for cell in row.replace("│", " ").split()[-2:]]
    bright = next(t for t in summary["tasks"] if t["name"] == "bright")
    assert errors == [round(bright["rel_error_quantized"], 4), round(bright["rel_error"], 4)]
    info = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "p"), "--json"]).output)
    assert all(t["rel_error_quantized"] > t["rel_error"] > 0 for t in info["tasks"])


def test_info_of_an_old_pack_has_no_quantized_error():
    old = Path(__file__).parents[1] / "fixtures" / "pack_v1" / "rtvq"
    assert all(t["rel_error_quantized"] is None for t in pack_summary(old)["tasks"])
    result = CliRunner().invoke(app, ["info", str(old)])
    assert result.exit_code == 0 and "n/a" in result.output


# -- merging: statistics never reach a method ----------------------------------------------


def test_statistics_are_not_merge_keys(toy):
    source = TaskSource(load_task_vectors(toy.pre_path, finetuned=toy.ft_paths)[0], _tvs(toy))
    assert not any(is_statistic(k) for k in source.keys)
    assert sorted(source.float_statistics) == sorted(k for k in toy.pre if k.endswith(STATS))
    assert sorted(source.statistics) == sorted(k for k in toy.pre if is_statistic(k))
    assert MergeInputs.of(TaskSource(source.pretrained, load_task_vectors(toy.pre_path, finetuned=toy.ft_paths)[1])).statistics == tuple(
        source.statistics
    )
    assert sorted(TaskSource(source.pretrained, _tvs(toy), statistics=[]).keys) == sorted(k for k in toy.pre if toy.pre[k].is_floating_point())
    with pytest.raises(ConfigError, match="'nope' is not a tensor"):
        TaskSource(source.pretrained, _tvs(toy), statistics=["nope"])


@pytest.mark.parametrize("method", ["ties", "emr", "magmax", "dare_ties"])
def test_weights_merge_as_if_the_statistics_were_not_there(toy, method):
    """Global TIES thresholds and EMR rescalers would be dominated by the huge BN deltas; now
    the weights merge exactly as they do for the same model without its statistics."""
    tvs = _tvs(toy)
    task = "dark" if method == "emr" else None
    with_stats = _quiet(merge_state_dict, method, toy.pre, tvs, task=task)
    plain_pre = {k: v for k, v in toy.pre.items() if not is_statistic(k)}
    plain = {t: TaskVector.from_state_dict({k: tv[k] for k in tv if not is_statistic(k)}, name=t) for t, tv in tvs.items()}
    without = merge_state_dict(method, plain_pre, plain, task=task)
    for key, value in without.items():
        assert torch.equal(with_stats[key], value), key
    old = merge_state_dict(method, toy.pre, tvs, task=task, statistics=[])
    if method in ("ties", "emr"):  # the old way: the statistics changed the weights' merge too
        assert any(not torch.equal(old[k], without[k]) for k in without)


# -- every choice ---------------------------------------------------------------------------


def test_each_choice_gives_the_statistics_it_names(toy):
    tvs = _tvs(toy)
    pre, fts = toy.pre, toy.fts
    pretrained = merge_state_dict("ties", pre, tvs, norm_stats="pretrained")
    mean = merge_state_dict("ties", pre, tvs, norm_stats="mean")
    own = merge_state_dict("ties", pre, tvs, norm_stats="task:dark")
    for key in [k for k in pre if k.endswith(STATS)]:
        assert torch.equal(pretrained[key], pre[key])
        expected = pre[key] + torch.stack([fts[t][key] - pre[key] for t in TASKS]).mean(0)
        torch.testing.assert_close(mean[key], expected, rtol=0, atol=0)
        torch.testing.assert_close(own[key], fts["dark"][key], rtol=1e-6, atol=1e-6)  # θ_pre + (θ_t − θ_pre) in fp32
    for state in (pretrained, mean):
        assert torch.equal(state["bn1.num_batches_tracked"], pre["bn1.num_batches_tracked"])
    weights = [k for k in pre if not is_statistic(k)]
    assert all(torch.equal(pretrained[k], own[k]) and torch.equal(pretrained[k], mean[k]) for k in weights)


def test_counters_come_from_the_chosen_tasks_checkpoint_or_the_pretrained(toy, tmp_path):
    fts = dict(toy.fts["bright"])
    fts["bn1.num_batches_tracked"] = torch.tensor(12345)
    save_file(fts, tmp_path / "bright.safetensors")
    pre, tvs = load_task_vectors(toy.pre_path, finetuned={"bright": tmp_path / "bright.safetensors", "dark": toy.ft_paths["dark"]})
    own = merge_state_dict("task_arithmetic", pre, tvs, norm_stats="task:bright")
    assert int(own["bn1.num_batches_tracked"]) == 12345
    for choice in ("pretrained", "mean", "task:dark"):
        state = merge_state_dict("task_arithmetic", pre, tvs, norm_stats=choice)
        expected = toy.fts["dark"] if choice == "task:dark" else toy.pre
        assert torch.equal(state["bn1.num_batches_tracked"], expected["bn1.num_batches_tracked"])
    quantize(toy.pre_path, toy.ft_paths, tmp_path / "p", QuantizeOptions(bits=4), progress=False)
    pre, tvs = load_task_vectors(toy.pre_path, packs=[tmp_path / "p"])
    state = merge_state_dict("task_arithmetic", pre, tvs, norm_stats="task:bright")  # packs do not store counters
    assert torch.equal(state["bn1.num_batches_tracked"], toy.pre["bn1.num_batches_tracked"])
    assert torch.equal(state["bn1.running_var"], pre.get("bn1.running_var") + tvs["bright"]["bn1.running_var"])


def test_default_choice_and_the_warning(toy):
    tvs = _tvs(toy)
    with pytest.warns(NormStatsWarning, match=rf"differ between the 3 task\(s\) and the pretrained model.*the {DEFAULT_NORM_STATS} ones"):
        default = merge_state_dict("task_arithmetic", toy.pre, tvs)
    assert all(torch.equal(default[k], v) for k, v in merge_state_dict("task_arithmetic", toy.pre, tvs, norm_stats=DEFAULT_NORM_STATS).items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_state_dict("task_arithmetic", toy.pre, tvs, norm_stats="mean")  # a choice made: no warning
        same = {t: TaskVector.from_state_dict({k: (torch.zeros_like(tv[k]) if is_statistic(k) else tv[k]) for k in tv}) for t, tv in tvs.items()}
        merge_state_dict("task_arithmetic", toy.pre, same)  # statistics unchanged by the tasks: it does not matter
        emr = merge_state_dict("emr", toy.pre, tvs, task="inverted")  # a per-task output: its own, no warning
    for key in [k for k in toy.pre if k.endswith(STATS)]:
        torch.testing.assert_close(emr[key], toy.fts["inverted"][key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("choice", "problem"), [("bogus", "expected pretrained, mean or task:NAME"), ("task:nope", "no task 'nope'")])
def test_bad_choices_are_one_line(toy, choice, problem):
    with pytest.raises(ConfigError, match=problem):
        merge_state_dict("task_arithmetic", toy.pre, _tvs(toy), norm_stats=choice)


def test_a_model_without_statistics_merges_byte_for_byte_as_before(tmp_path):
    """No running statistics: no warning, no metadata, every tensor merged (even with --norm-stats)."""
    pre = small_model()
    g = torch.Generator().manual_seed(1)
    tvs = {t: TaskVector.from_state_dict({k: torch.randn(v.shape, generator=g) * 0.01 for k, v in pre.items() if v.is_floating_point()})
           for t in ("a", "b")}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = merge("ties", pre, tvs, tmp_path / "m.safetensors", norm_stats="mean")
        plain = merge_state_dict("ties", pre, tvs, statistics=[])
    assert report.norm_stats is None
    written = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(written[k], plain[k]) for k in plain)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert "tvq_norm_stats" not in (f.metadata() or {})


# -- EMR: every task's own statistics in the unified pack ----------------------------------


def test_emr_unified_pack_keeps_each_tasks_statistics(toy, tmp_path):
    pre, tvs = load_task_vectors(toy.pre_path, finetuned=toy.ft_paths)
    merge("emr", pre, tvs, tmp_path / "emr.safetensors")
    pack = open_emr(tmp_path / "emr.safetensors")
    assert pack.version == "3" and sorted(pack.stat_keys) == sorted(k for k in toy.pre if k.endswith(STATS))
    assert not any(is_statistic(k) for k in pack.keys)
    for task in TASKS:
        report = emr_task_model(tmp_path / "emr.safetensors", toy.pre_path, task, tmp_path / f"{task}.safetensors")
        assert report.norm_stats == f"task:{task}"
        out = load_file(tmp_path / f"{task}.safetensors")
        direct = merge_state_dict("emr", pre, tvs, task=task)
        for key in toy.pre:
            if key.endswith("num_batches_tracked"):  # a counter: the task's from its checkpoint, the pretrained's from a pack
                assert torch.equal(out[key], toy.pre[key]) and torch.equal(direct[key], toy.fts[task][key])
                continue
            torch.testing.assert_close(out[key], direct[key], rtol=0, atol=1e-6)
        for key in pack.stat_keys:
            torch.testing.assert_close(out[key], toy.fts[task][key], rtol=1e-6, atol=1e-6)
    emr_task_model(tmp_path / "emr.safetensors", toy.pre_path, "dark", tmp_path / "m.safetensors", norm_stats="mean")
    mean = load_file(tmp_path / "m.safetensors")
    expected = merge_state_dict("task_arithmetic", pre, tvs, norm_stats="mean")
    for key in pack.stat_keys:
        torch.testing.assert_close(mean[key], expected[key], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="unified pack keeps every task's own"):
        merge("emr", pre, tvs, tmp_path / "emr2.safetensors", norm_stats="mean")


def test_an_older_unified_pack_of_a_bn_model_reads_with_a_warning(toy, tmp_path):
    pre, tvs = load_task_vectors(toy.pre_path, finetuned=toy.ft_paths)
    merge("emr", pre, tvs, tmp_path / "old.safetensors", statistics=[])  # as tvq wrote it before: statistics merged
    assert open_emr(tmp_path / "old.safetensors").version == "2"
    with pytest.warns(NormStatsWarning, match="predates per-task statistics"):
        emr_task_model(tmp_path / "old.safetensors", toy.pre_path, "dark", tmp_path / "m.safetensors")
    old = merge_state_dict("emr", pre, tvs, task="dark", statistics=[])
    out = load_file(tmp_path / "m.safetensors")
    torch.testing.assert_close(out["bn1.running_var"], old["bn1.running_var"], rtol=0, atol=1e-5)


def test_emr_pack_without_statistics_is_still_version_2(tmp_path):
    pre = small_model()
    tvs = {t: TaskVector.from_state_dict({k: torch.full(v.shape, 0.01 * (i + 1)) for k, v in pre.items() if v.is_floating_point()})
           for i, t in enumerate(("a", "b"))}  # fmt: skip
    merge("emr", pre, tvs, tmp_path / "emr.safetensors")
    pack = open_emr(tmp_path / "emr.safetensors")
    assert pack.version == "2" and pack.stat_keys == []


# -- re-estimation --------------------------------------------------------------------------


def test_reestimate_is_the_plain_average_and_restores_everything(toy):
    model = load(toy.pre)
    model.train()
    model.bn2.eval()
    model.bn1.momentum = 0.3
    weights = {k: v.clone() for k, v in model.state_dict().items() if not is_statistic(k)}
    batches = [toy.unlabeled["bright"][:64], toy.unlabeled["dark"][:32], toy.unlabeled["inverted"][:64]]
    assert reestimate_norm_stats(model, batches) == 3
    with torch.no_grad():
        means = torch.stack([model.conv1(b).mean((0, 2, 3)) for b in batches])
    torch.testing.assert_close(model.bn1.running_mean, means.mean(0), rtol=1e-5, atol=1e-5)  # per batch, not per image
    assert int(model.bn1.num_batches_tracked) == 3
    assert model.training and not model.bn2.training and model.bn1.training and model.bn1.momentum == 0.3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    reversed_model = load(toy.pre)
    reestimate_norm_stats(reversed_model, batches[::-1])
    torch.testing.assert_close(reversed_model.bn1.running_var, model.bn1.running_var, rtol=1e-5, atol=1e-6)


def test_reestimate_options_and_edge_cases(toy):
    model = load(toy.pre)
    before = model.bn1.running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        reestimate_norm_stats(model, iter(()))
    assert torch.equal(model.bn1.running_mean, before)  # refused before anything was reset
    assert reestimate_norm_stats(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 2)]) == 0
    x = toy.unlabeled["dark"][:64]
    reestimate_norm_stats(model, [x], momentum=0.5)
    with torch.no_grad():
        batch_mean = model.conv1(x).mean((0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, 0.5 * batch_mean, rtol=1e-5, atol=1e-5)  # from the reset 0
    seen = []
    reestimate_norm_stats(model, [{"x": x}], forward=lambda m, b: seen.append(m(b["x"])))
    assert len(seen) == 1


# -- the BN model: the default beats the old behaviour, re-estimation beats both ------------


def test_choices_on_the_bn_model(toy):
    """Measured on the suite's BN model (all numbers in docs/merging.md, benchmarks/norm_stats.py):
    the default beats merging the statistics as weights (TIES 52.9 against 47.9 %, MagMax 52.7
    against 44.3, task arithmetic 60.4 against 57.4); a task's own statistics are far better on
    the task whose inputs differ most (bright: 95 against 27 %); re-estimating per task on
    unlabeled inputs beats every data-free choice."""
    tvs = _tvs(toy)

    def avg(acc: dict[str, float]) -> float:
        return sum(acc.values()) / len(acc)

    margin = {"task_arithmetic": 0.0, "ties": 0.02, "magmax": 0.02}
    for method in margin:
        old = toy.accuracies(merge_state_dict(method, toy.pre, tvs, statistics=[]))
        default = toy.accuracies(_quiet(merge_state_dict, method, toy.pre, tvs))
        own = {t: toy.accuracy(merge_state_dict(method, toy.pre, tvs, norm_stats=f"task:{t}"), t) for t in TASKS}
        per_task = {}
        for t in TASKS:
            model = load(_quiet(merge_state_dict, method, toy.pre, tvs))
            reestimate_norm_stats(model, [toy.unlabeled[t]])
            per_task[t] = toy.accuracy(model, t)
        assert avg(default) > avg(old) + margin[method], (method, default, old)
        if method != "magmax":  # MagMax's weights fit no task's statistics (own 43.5 %)
            assert own["bright"] - old["bright"] > 0.3, (method, own, old)
        assert avg(per_task) > avg(default) + 0.1 and avg(per_task) > avg(own), (method, per_task)


# -- the command line, executors, budgets ---------------------------------------------------


def _merge_cli(*args) -> object:
    return CliRunner().invoke(app, ["merge", *map(str, args), "--no-progress"], env={"COLUMNS": "300"})


def test_cli_norm_stats(toy, tmp_path):
    fts = [a for t, p in toy.ft_paths.items() for a in ("-f", f"{t}={p}")]
    result = _merge_cli("--method", "ties", "-p", toy.pre_path, *fts, "-o", tmp_path / "default.safetensors")
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert line.count("warning:") == 1 and "6 running statistics (e.g. bn1.running_mean) differ" in line
    assert "mean running statistics" in line  # the summary says which
    result = _merge_cli(
        "--method", "ties", "-p", toy.pre_path, *fts, "-o", tmp_path / "pre.safetensors", "--norm-stats", "pretrained", "--threads", "1"
    )
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    out = load_file(tmp_path / "pre.safetensors")
    assert torch.equal(out["bn2.running_var"], toy.pre["bn2.running_var"])
    result = _merge_cli("--method", "ties", "-p", toy.pre_path, *fts, "-o", tmp_path / "x.safetensors", "--norm-stats", "task:nope")
    assert result.exit_code == 2 and "error: --norm-stats task:nope: no task 'nope'" in " ".join(result.output.split())
    # EMR: the unified pack, then one task's model with its own statistics, or the mean
    assert _merge_cli("--method", "emr", "-p", toy.pre_path, *fts, "-o", tmp_path / "emr.safetensors").exit_code == 0
    result = _merge_cli(
        "--method", "emr", "--unified", tmp_path / "emr.safetensors", "--task", "dark", "-p", toy.pre_path, "-o", tmp_path / "d.safetensors"
    )
    assert result.exit_code == 0 and "warning" not in result.output and "task:dark running statistics" in result.output, result.output
    torch.testing.assert_close(load_file(tmp_path / "d.safetensors")["bn1.running_mean"], toy.fts["dark"]["bn1.running_mean"])


def test_executors_give_the_same_bytes_with_statistics(toy, tmp_path):
    pre, tvs = load_task_vectors(toy.pre_path, finetuned=toy.ft_paths)
    outs = []
    for i, threads in enumerate((1, 2)):
        report = _quiet(merge, "ties", pre, tvs, tmp_path / f"m{i}.safetensors", executor=make_executor("local", None, threads))
        assert report.norm_stats == DEFAULT_NORM_STATS
        outs.append((tmp_path / f"m{i}.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_budget_allocation_keeps_statistics_exact(toy, tmp_path):
    quantize_within_budget(
        toy.pre_path, toy.ft_paths, tmp_path / "b", QuantizeOptions(bits=4), budget_bits=40.0, progress=False
    )  # a tiny model: headers dominate
    pack = open_pack(tmp_path / "b")
    for key in [k for k in toy.pre if k.endswith(STATS)]:
        assert pack.manifest.files[pack.manifest.tasks[0].file].tensors[key].kind == "raw"
        assert torch.equal(pack.task_vector("dark")[key], toy.fts["dark"][key] - toy.pre[key])
