"""A stranger's pack: every name confined to the pack, every field validated when the manifest
is read, recorded paths never opened unasked, nothing decoded to NaN. Each attack asserts the
exit code, the one line, and that no byte outside the output changed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tvq.cli import app

from attack import every_task_entry, first_q, one_line_refusal, read_manifest_json, snapshot, tamper, write_manifest_json

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    one_line_refusal(result, *fragments)


def make_pack(tiny: dict, out: Path, *extra: str) -> Path:
    args = ["quantize", "-p", tiny["pre_path"], "--out", out, "--no-progress", *extra]
    for name, p in tiny["ft_paths"].items():
        args += ["-f", f"{name}={p}"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def pack(tiny) -> Path:
    return make_pack(tiny, tiny["dir"] / "packs" / "p", "--bits", "4")


@pytest.fixture
def rtvq(tiny) -> Path:
    return make_pack(tiny, tiny["dir"] / "packs" / "r", "--bits", "2", "--residual")


def merge_args(tiny: dict, pack: Path, out: Path) -> list[object]:
    return ["merge", "--pack", pack, "--pretrained", tiny["pre_path"], "--method", "task_arithmetic", "--out", out, "--no-progress"]


# ---- 1. nothing outside the folder ------------------------------------------------------


def _rename_task_file(m: dict, new_name: str) -> None:
    old = m["tasks"][0]["file"]
    m["files"][new_name] = m["files"].pop(old)
    m["tasks"][0]["file"] = new_name


def test_add_cannot_write_outside_its_output(tiny, pack):
    """The reported attack: a manifest naming '../.bashrc' made `tvq add --out` replace the
    .bashrc beside the new pack with a file shipped beside the old one."""
    d = tiny["dir"]
    shipped = pack.parent / ".bashrc"
    shutil.copy(pack / read_manifest_json(pack)["tasks"][0]["file"], shipped)
    tamper(pack, lambda m: _rename_task_file(m, "../.bashrc"))
    victim_dir = d / "out"
    victim_dir.mkdir()
    (victim_dir / ".bashrc").write_text("alias ls='ls --color'\n")
    before = snapshot(d)
    r = run("add", pack, "-f", f"extra={tiny['ft_paths']['task0']}", "--pretrained", tiny["pre_path"], "--out", victim_dir / "new", "--no-progress")
    assert_one_line_error(r, "manifest.json", "'..' component")
    assert snapshot(d) == before
    assert not (victim_dir / "new").exists()


def test_verify_is_no_file_content_oracle(tiny, pack):
    secret = tiny["dir"] / "secret.txt"
    secret.write_text("hunter2\n")
    data = secret.read_bytes()

    def point_at_secret(m: dict) -> None:
        _rename_task_file(m, str(secret))
        m["files"][str(secret)].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    tamper(pack, point_at_secret)
    r = run("verify", pack)
    assert_one_line_error(r, "manifest.json", "absolute path")
    assert "ok" not in r.output.split("error:")[0]


@pytest.mark.parametrize(
    "name", ["tasks\\..\\..\\x.safetensors", "tasks//x.safetensors", "./x.safetensors", "tasks/x.txt", "tasks/\x01x.safetensors"]
)
def test_file_names_tvq_would_not_write_are_refused(tiny, pack, name):
    tamper(pack, lambda m: _rename_task_file(m, name))
    assert_one_line_error(run("info", pack), "manifest.json", "file name")


def test_symlink_out_of_the_pack_is_refused(tiny, pack):
    rel = read_manifest_json(pack)["tasks"][0]["file"]
    outside = tiny["dir"] / "outside.safetensors"
    shutil.move(pack / rel, outside)  # same bytes, so size and checksum would match
    os.symlink(outside, pack / rel)
    before = snapshot(tiny["dir"])
    assert_one_line_error(run("verify", pack), "manifest.json", "leads outside")
    assert_one_line_error(run(*merge_args(tiny, pack, tiny["dir"] / "m.safetensors")), "leads outside")
    assert snapshot(tiny["dir"]) == before


# ---- 2. validated once, completely, when read ---------------------------------------------


def _set_q(field: str, value: object):
    def change(m: dict) -> None:
        tensors, key = first_q(m)
        tensors[key][field] = value

    return change


def _set_param(name: str, value: object):
    def change(m: dict) -> None:
        tensors, key = first_q(m)
        tensors[key]["params"][name] = value

    return change


def _every_task(key_kind: str, change_entry):
    def change(m: dict) -> None:
        _, key = first_q(m, key_kind)
        for e in every_task_entry(m, key):
            change_entry(e)

    return change


def _del_const_value(m: dict) -> None:
    tensors, key = first_q(m, "const")
    tensors[key]["value"] = None


def _make_const(shape: list[int]):
    def change_entry(e: dict) -> None:
        e.clear()
        e.update(kind="const", shape=shape, dtype="float32", bits=4, value=0.0)

    return _every_task("q", change_entry)


MANIFEST_ATTACKS = {
    "bits out of range": (_set_q("bits", 9), "bits 9 not valid"),
    "bits as JSON true": (_set_q("bits", True), "valid integer"),
    "nbytes off by one": (lambda m: first_q(m)[0][first_q(m)[1]].update(nbytes=first_q(m)[0][first_q(m)[1]]["nbytes"] + 1), "nbytes"),
    "negative dimension": (_every_task("q", lambda e: e.update(shape=[-16, -12])), "non-negative"),
    "scale zero": (_set_param("scale", 0.0), "not positive"),
    "scale NaN": (_set_param("scale", math.nan), "'scale' is nan"),
    "scale denormal": (_set_param("scale", 1e-45), "beyond float32"),
    "zero point missing": (lambda m: first_q(m)[0][first_q(m)[1]]["params"].pop("zero_point"), "needs parameters"),
    "unknown quantizer": (_set_q("scheme", "magic"), "unknown quantizer"),
    "constant without value": (_del_const_value, "constant needs a finite float32 value"),
    "constant beyond float32": (lambda m: first_q(m, "const")[0][first_q(m, "const")[1]].update(value=1e39), "finite float32 value"),
    "huge constant": (_make_const([100000, 100000]), "more than the cap"),
    "raw tensor with bits": (lambda m: first_q(m, "raw")[0][first_q(m, "raw")[1]].update(bits=4), "raw tensor has no bits"),
    "raw nbytes lie": (lambda m: first_q(m, "raw")[0][first_q(m, "raw")[1]].update(nbytes=4), "nbytes"),
    "shape differs across tasks": (lambda m: first_q(m)[0][first_q(m)[1]].update(shape=[12, 16]), "differs"),
    "task file not listed": (lambda m: m["tasks"][1].update(file="tasks/999-x.safetensors"), "not listed in files"),
    "two tasks of one name": (lambda m: m["tasks"][1].update(name=m["tasks"][0]["name"]), "appears twice"),
    "no tasks": (lambda m: m.update(tasks=[]), "at least one task"),
    "file nobody references": (lambda m: m["files"].update({"tasks/x.safetensors": next(iter(m["files"].values()))}), "not a task's file"),
    "method bits zero": (lambda m: m["method"].update(bits=0), "method.bits"),
    "residual without base": (lambda m: m["method"].update(residual=True, base_bits=3), "base file"),
    "FQ residual": (lambda m: m["method"].update(target="finetuned", residual=True, base_bits=3), "method"),
    "unknown field": (lambda m: m["method"].update(shell="rm -rf /"), "method.shell"),
    "tasks is a dict": (lambda m: m.update(tasks={"a": 1}), "tasks"),
    "NaN rel_error": (lambda m: m["tasks"][0].update(rel_error=math.nan), "rel_error"),
    "sha256 not hex": (_set_q("sha256", "../../etc/passwd"), "64 hex"),
}


@pytest.mark.parametrize("attack", list(MANIFEST_ATTACKS))
def test_manifest_fields_are_validated_when_read(tiny, pack, attack):
    change, fragment = MANIFEST_ATTACKS[attack]
    tamper(pack, change)
    out = tiny["dir"] / "merged.safetensors"
    before = snapshot(tiny["dir"])
    for args in (("info", pack), ("verify", pack), merge_args(tiny, pack, out)):
        assert_one_line_error(run(*args), "manifest.json", fragment)
    assert snapshot(tiny["dir"]) == before and not out.exists()


def test_rtvq_base_references_are_validated(tiny, rtvq):
    tamper(rtvq, lambda m: m["files"].pop(m["base_file"]))
    assert_one_line_error(run("info", rtvq), "base_file", "not listed in files")


def test_group_scheme_aux_sizes_are_validated(tiny):
    pack = make_pack(tiny, tiny["dir"] / "g", "--bits", "2", "--quantizer", "group", "--group-size", "8")

    def shrink_aux(m: dict) -> None:
        tensors, key = first_q(m)
        tensors[key]["aux"]["lo"]["nbytes"] = 4

    tamper(pack, shrink_aux)
    assert_one_line_error(run("info", pack), "::lo", "nbytes")


def test_group_size_cannot_ask_for_a_huge_allocation(tiny):
    pack = make_pack(tiny, tiny["dir"] / "g", "--bits", "2", "--quantizer", "group", "--group-size", "8")
    tamper(pack, _set_param("group_size", 1e12))
    assert_one_line_error(run("info", pack), "group_size")


def test_manifest_json_bombs(tiny, pack):
    (pack / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(run("info", pack), "manifest.json", "unreadable manifest")
    (pack / "manifest.json").write_text('{"format": "tvq-pack", "version": ' + "9" * 5000 + "}")
    assert_one_line_error(run("info", pack), "manifest.json")


# ---- recorded paths are never opened unasked ----------------------------------------------


class _Trap:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _trap_pickle(d: Path) -> tuple[Path, Path]:
    marker = d / "PWNED"
    evil = d / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": _Trap(marker)}))
    return evil, marker


def test_recorded_paths_are_never_opened_unasked(tiny, rtvq):
    d = tiny["dir"]
    evil, marker = _trap_pickle(d)

    def point_at_trap(m: dict) -> None:
        m["pretrained"]["path"] = str(evil)
        for t in m["tasks"]:
            t["source"]["path"] = str(evil)

    tamper(rtvq, point_at_trap)
    r = run("merge", "--pack", rtvq, "--method", "task_arithmetic", "--out", d / "m.safetensors", "--unsafe-pickle", "--no-progress")
    assert_one_line_error(r, "--pretrained is required", str(evil))
    r = run("export", rtvq, "--task", "task0", "--model", "--out", d / "x.safetensors", "--unsafe-pickle", "--no-progress")
    assert_one_line_error(r, "needs the pretrained model")
    r = run("rebase", rtvq, "--out", d / "r2", "--pretrained", tiny["pre_path"], "--unsafe-pickle", "--no-progress")
    assert_one_line_error(r, "needs its original checkpoint", "--finetuned task0=PATH")
    r = run("add", rtvq, "-f", f"new={tiny['ft_paths']['task0']}", "--out", d / "a", "--unsafe-pickle", "--no-progress")
    assert_one_line_error(r, "needs the pretrained model")
    assert not marker.exists()
    assert not any((d / n).exists() for n in ("m.safetensors", "x.safetensors", "r2", "a"))


def test_rebase_from_named_sources_checks_their_hash(tiny, rtvq):
    d = tiny["dir"]
    fts = tiny["ft_paths"]
    named = [a for n, p in fts.items() for a in ("-f", f"{n}={p}")]
    r = run("rebase", rtvq, "--out", d / "r2", "--pretrained", tiny["pre_path"], *named, "--no-progress")
    assert r.exit_code == 0, r.output
    swapped = ["-f", f"task0={fts['task1']}", "-f", f"task1={fts['task0']}", "-f", f"task2={fts['task2']}"]
    r = run("rebase", rtvq, "--out", d / "r3", "--pretrained", tiny["pre_path"], *swapped, "--no-progress")
    assert_one_line_error(r, "content differs")
    assert not (d / "r3").exists()


# ---- 3. no silent NaN ---------------------------------------------------------------------


def _rewrite_tensor(pack: Path, rel: str, key: str, value: float) -> None:
    """Put ``value`` into a stored raw tensor, then re-sign file and manifest as an attacker can."""
    from tvq.io.safetensors_writer import sha256_tensor

    file = pack / rel
    tensors = load_file(file)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, file)
    data = file.read_bytes()

    def resign(m: dict) -> None:
        entry = m["files"][rel]
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        entry["tensors"][key]["sha256"] = sha256_tensor(tensors[key])

    tamper(pack, resign)


def test_stored_nan_is_an_error_not_a_model(tiny, pack):
    m = read_manifest_json(pack)
    rel = m["tasks"][0]["file"]
    _, key = first_q(m, "raw")
    _rewrite_tensor(pack, rel, key, math.nan)
    out = tiny["dir"] / "m.safetensors"
    assert_one_line_error(run(*merge_args(tiny, pack, out)), rel, key, "NaN or Inf")
    assert not out.exists()


def test_base_plus_offset_overflow_is_an_error(tiny, rtvq):
    """Base and offset each decode to a finite 3e38; their sum does not."""
    m = read_manifest_json(rtvq)
    shape = next(e["shape"] for e in m["files"][m["base_file"]]["tensors"].values() if e["kind"] == "q")

    def overflow_with_shape(m: dict) -> None:
        base = m["files"][m["base_file"]]["tensors"]
        key = next(k for k, e in base.items() if e["kind"] == "q")
        for e in [base[key], *every_task_entry(m, key)]:
            e.clear()
            e.update(kind="const", shape=shape, dtype="float32", bits=2, value=3e38)

    tamper(rtvq, overflow_with_shape)
    out = tiny["dir"] / "m.safetensors"
    assert_one_line_error(run(*merge_args(tiny, rtvq, out)), "overflows float32")
    assert not out.exists()
    r = run("export", rtvq, "--task", "task0", "--out", tiny["dir"] / "tv.safetensors", "--no-progress")
    assert_one_line_error(r, "overflows float32")


def test_valid_packs_still_open_after_a_json_round_trip(tiny, pack, rtvq):
    """The validator accepts what tvq writes (every kind of pack) — the control for the above."""
    for p in (
        pack,
        rtvq,
        make_pack(tiny, tiny["dir"] / "fq", "--target", "finetuned", "--bits", "8"),
        make_pack(tiny, tiny["dir"] / "g", "--bits", "3", "--quantizer", "group", "--group-size", "8"),
    ):
        write_manifest_json(p, read_manifest_json(p))
        r = run("verify", p)
        assert r.exit_code == 0, r.output
        assert json.loads(run("info", p, "--json").output)["tasks"]
