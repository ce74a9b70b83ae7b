"""The tvq command end to end, and every bad input: one line, non-zero exit, nothing lost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tvq.cli import app
from tvq.pack.manifest import manifest_checksum

from conftest import files_bytes, peak_rss_now, rss_shown_within, run_stats, shown

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def quantize_args(tiny, out, *extra):
    args = ["quantize", "--pretrained", tiny["pre_path"], "--out", out, "--no-progress"]
    for name, p in tiny["ft_paths"].items():
        args += ["--finetuned", f"{name}={p}"]
    return [*args, *extra]


def assert_one_line_error(result, *fragments: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = result.output.strip().split("\r")[-1].split("error:", 1)
    assert len(text) == 2, result.output  # progress bars may precede the one error line
    text = "error:" + text[1]
    for f in fragments:
        assert f in " ".join(text.split()), (f, text)


def test_quantize_info_export_round_trip(tiny):
    out = tiny["dir"] / "pack"
    r = run(*quantize_args(tiny, out, "--bits", "3", "--residual", "--base-bits", "4", "--error-correction"))
    assert r.exit_code == 0, r.output
    info = json.loads(run("info", out, "--json").output)
    assert info["method"]["label"] == "RTVQ B4O3+EC"
    assert [t["name"] for t in info["tasks"]] == ["task0", "task1", "task2"]
    assert all(0 < t["rel_error"] < 0.5 for t in info["tasks"])
    table = run("info", out, "--verify")
    assert table.exit_code == 0 and "task1" in table.output and "verified" in table.output
    r = run("export", out, "--task", "task1", "--out", tiny["dir"] / "tv.safetensors")
    assert r.exit_code == 0, r.output
    tv = load_file(tiny["dir"] / "tv.safetensors")
    true_tv = {k: tiny["fts"]["task1"][k] - v for k, v in tiny["pre"].items() if v.is_floating_point()}
    assert set(tv) == set(true_tv)
    num = sum(float((tv[k] - true_tv[k]).pow(2).sum()) for k in tv) ** 0.5
    den = sum(float(v.pow(2).sum()) for v in true_tv.values()) ** 0.5
    assert num / den == pytest.approx(info["tasks"][1]["rel_error"], rel=1e-4)
    r = run("export", out, "--task", "task1", "--model", "--pretrained", tiny["pre_path"], "--out", tiny["dir"] / "model.safetensors")
    model = load_file(tiny["dir"] / "model.safetensors")
    assert set(model) == set(tiny["pre"])
    assert torch.equal(model["embeddings.position_ids"], tiny["pre"]["embeddings.position_ids"])
    assert torch.allclose(model["encoder.layer.0.attn.weight"], tiny["pre"]["encoder.layer.0.attn.weight"] + tv["encoder.layer.0.attn.weight"])


def test_paper_config_file_is_accepted(tiny):
    cfg = tiny["dir"] / "quantize_config.json"
    cfg.write_text(
        '{"quantize_target": "finetuned_model", "quantize_residual": false, "quantize_task_bit": 8,'
        ' "quantize_base_bit": null, "q_error_correction": false}'
    )
    out = tiny["dir"] / "pack"
    assert run(*quantize_args(tiny, out, "--config", cfg)).exit_code == 0
    assert json.loads(run("info", out, "--json").output)["method"]["label"] == "FQ INT8"


def test_average_command(tiny):
    out = tiny["dir"] / "avg.safetensors"
    args = ["average", "--out", out, "--no-progress"] + [a for n, p in tiny["ft_paths"].items() for a in ("-f", f"{n}={p}")]
    assert run(*args).exit_code == 0
    mean = sum(f["encoder.layer.0.mlp.weight"] for f in tiny["fts"].values()) / 3
    assert torch.allclose(load_file(out)["encoder.layer.0.mlp.weight"], mean, atol=1e-7)


def test_quantize_add_rebase_report_io_and_memory(tiny):
    """Issue 6: bytes read and written and peak memory at the end of every run."""
    d, fts = tiny["dir"], dict(tiny["ft_paths"])
    last = fts.pop("task2")
    args = ["quantize", "-p", tiny["pre_path"], "--out", d / "p2", "--no-progress", "--residual", "--bits", "2"]
    args += ["--average-out", d / "avg.safetensors"]
    rss_before, start = peak_rss_now(), time.perf_counter()
    r = run(*args, *(a for n, p in fts.items() for a in ("-f", f"{n}={p}")))
    elapsed, rss_after = time.perf_counter() - start, peak_rss_now()
    assert r.exit_code == 0, r.output
    stats = run_stats(r.output)
    inputs = [tiny["pre"], *(tiny["fts"][n] for n in fts)]
    tensor_bytes = sum(t.numel() * t.element_size() for sd in inputs for k, t in sd.items() if t.is_floating_point() or sd is tiny["pre"])
    assert shown(stats["read"], tensor_bytes)
    assert shown(stats["wrote"], files_bytes(d / "p2") + files_bytes(d / "avg.safetensors"))
    # the peak RSS is this process's (the command ran in it), measured during the run: in bytes, not KiB
    assert rss_shown_within(stats["peak_rss"], rss_before, rss_after), (stats["peak_rss"], rss_before, rss_after)
    assert 0 <= stats["seconds"] <= elapsed + 0.05  # shown to 0.1 s, in seconds, of this run
    r = run("add", d / "p2", "-f", f"task2={last}", "--out", d / "p3", "-p", tiny["pre_path"], "--no-progress")
    assert r.exit_code == 0, r.output
    new_files = [d / "p3" / "manifest.json", *(d / "p3" / "tasks").glob("002-*")]
    assert shown(run_stats(r.output)["wrote"], sum(f.stat().st_size for f in new_files))  # old files are hard links
    sources = [a for n, p in tiny["ft_paths"].items() for a in ("-f", f"{n}={p}")]
    r = run("rebase", d / "p3", "--out", d / "p4", "-p", tiny["pre_path"], *sources, "--no-progress")
    assert r.exit_code == 0, r.output
    assert shown(run_stats(r.output)["wrote"], files_bytes(d / "p4"))
    assert run_stats(r.output)["read"] > tensor_bytes


# ---- bad input -------------------------------------------------------------------------


def test_missing_file(tiny):
    tiny["ft_paths"]["task0"] = tiny["dir"] / "nope.safetensors"
    assert_one_line_error(run(*quantize_args(tiny, tiny["dir"] / "p")), "nope.safetensors", "not found")


def test_mismatched_keys(tiny):
    sd = dict(tiny["fts"]["task1"])
    del sd["encoder.layer.2.mlp.weight"]
    save_file(sd, tiny["ft_paths"]["task1"])
    assert_one_line_error(run(*quantize_args(tiny, tiny["dir"] / "p")), "task1.safetensors", "encoder.layer.2.mlp.weight", "missing")


def test_mismatched_shapes(tiny):
    sd = dict(tiny["fts"]["task2"])
    sd["encoder.layer.0.mlp.weight"] = torch.zeros(24, 17)
    save_file(sd, tiny["ft_paths"]["task2"])
    assert_one_line_error(run(*quantize_args(tiny, tiny["dir"] / "p")), "task2.safetensors", "encoder.layer.0.mlp.weight", "[24, 17]", "[24, 16]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_input(tiny, bad):
    sd = dict(tiny["fts"]["task0"])
    sd["encoder.layer.1.attn.weight"] = sd["encoder.layer.1.attn.weight"].clone()
    sd["encoder.layer.1.attn.weight"][3, 4] = bad
    save_file(sd, tiny["ft_paths"]["task0"])
    out = tiny["dir"] / "p"
    assert_one_line_error(run(*quantize_args(tiny, out)), "task0.safetensors", "encoder.layer.1.attn.weight", "NaN or Inf")
    assert not out.exists() and not list(tiny["dir"].glob(".p.tmp-*"))  # nothing half-written left


@pytest.mark.parametrize("bits", ["0", "9"])
def test_bits_out_of_range(tiny, bits):
    assert_one_line_error(run(*quantize_args(tiny, tiny["dir"] / "p", "--bits", bits)), "out of range")


def test_unknown_config_key(tiny):
    cfg = tiny["dir"] / "c.json"
    cfg.write_text('{"quantize_target": "task_vector", "quantize_bits": 4}')
    result = run(*quantize_args(tiny, tiny["dir"] / "p", "--config", cfg))
    assert_one_line_error(result, "c.json", "unknown config key 'quantize_bits'", "quantize_task_bit")


def test_existing_output_is_not_overwritten(tiny):
    out = tiny["dir"] / "p"
    assert run(*quantize_args(tiny, out)).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    assert_one_line_error(run(*quantize_args(tiny, out, "--bits", "2")), "already exists", "--overwrite")
    assert (out / "manifest.json").read_bytes() == before
    assert run(*quantize_args(tiny, out, "--bits", "2", "--overwrite")).exit_code == 0
    assert (out / "manifest.json").read_bytes() != before


def test_output_may_not_be_an_input(tiny):
    before = tiny["pre_path"].read_bytes()
    assert_one_line_error(run(*quantize_args(tiny, tiny["pre_path"], "--overwrite")), "overwrite the input")
    assert tiny["pre_path"].read_bytes() == before


def _packed(tiny) -> Path:
    out = tiny["dir"] / "p"
    assert run(*quantize_args(tiny, out, "--bits", "2")).exit_code == 0
    return out


def test_truncated_pack(tiny):
    out = _packed(tiny)
    f = out / "tasks" / "001-task1.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_one_line_error(run("info", out), "001-task1.safetensors", "truncated")


def test_tampered_pack_data(tiny):
    out = _packed(tiny)
    f = out / "tasks" / "000-task0.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # flip the bits of one packed code byte, same size
    f.write_bytes(bytes(data))
    assert_one_line_error(run("verify", out), "000-task0.safetensors", "checksum mismatch")
    r = run("export", out, "--task", "task0", "--out", tiny["dir"] / "x.safetensors")
    assert_one_line_error(r, "000-task0.safetensors", "checksum mismatch")
    assert not (tiny["dir"] / "x.safetensors").exists()


def test_tampered_manifest(tiny):
    out = _packed(tiny)
    m = json.loads((out / "manifest.json").read_text())
    entry = next(iter(m["files"].values()))["tensors"]["encoder.layer.0.attn.weight"]
    entry["params"]["scale"] *= 2
    (out / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run("info", out), "manifest.json", "checksum mismatch")


def test_manifest_with_an_unknown_input_digest_algorithm(tiny):
    """A digest this tvq cannot recompute is refused when the manifest is read, even with a
    consistent manifest checksum (a pack from a newer tvq, or a hand-edited one)."""
    out = _packed(tiny)
    m = json.loads((out / "manifest.json").read_text())
    m["pretrained"]["digest"] = "md5:" + m["pretrained"]["digest"].partition(":")[2]
    m["digest"] = manifest_checksum({k: v for k, v in m.items() if k != "digest"})
    (out / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run("info", out), "manifest.json", "pretrained.digest")


def test_not_a_pack_and_unknown_task(tiny):
    assert_one_line_error(run("info", tiny["dir"]), "not a tvq pack")
    out = _packed(tiny)
    assert_one_line_error(run("export", out, "--task", "nope", "--out", tiny["dir"] / "x.safetensors"), "no task 'nope'", "task0")


def test_residual_flags_validated(tiny):
    assert_one_line_error(run(*quantize_args(tiny, tiny["dir"] / "p", "--target", "finetuned", "--residual")), "needs target=task_vector")
    assert_one_line_error(run(*quantize_args(tiny, tiny["dir"] / "p", "--target", "weights")), "target='weights'")


def test_user_text_is_printed_literally(tiny):
    """Paths and names are never rich markup: `--out "packs/[x]"` prints as given."""
    out = tiny["dir"] / "packs" / "[bold]x[/]"
    r = run(*quantize_args(tiny, out))
    assert r.exit_code == 0, r.output
    assert "[bold]x[/]" in r.output
    assert "[bold]x[/]" in run("info", out).output
    r = run("info", tiny["dir"] / "[red]nope")
    assert r.exit_code == 2 and "[red]nope" in r.output


def test_a_bare_paper_checkpoint_is_named_after_its_task_folder(tmp_path):
    from tvq.cli_support import parse_named_paths

    (tmp_path / "Cars").mkdir()
    (tmp_path / "Cars" / "finetuned.pt").write_bytes(b"")
    (tmp_path / "other.safetensors").write_bytes(b"")
    named = parse_named_paths([str(tmp_path / "Cars" / "finetuned.pt"), str(tmp_path / "other.safetensors"), f"x={tmp_path / 'Cars'}"])
    assert named == {"Cars": tmp_path / "Cars" / "finetuned.pt", "other": tmp_path / "other.safetensors", "x": tmp_path / "Cars"}
