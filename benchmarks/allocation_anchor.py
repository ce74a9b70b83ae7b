"""Anchored vs free bit allocation between TVQ INT2 and INT3, and which proxy tracks accuracy.

Issue 15: an allocation must never merge worse than the fixed scheme it could have chosen. For
one benchmark run this writes TVQ INT2 and INT3, then allocates at four budgets (INT2's measured
size, 1/3 and 2/3 of the way to INT3's, INT3's) with the old free choice and the anchored default
(both ``--quantizer mse``: MSE or min–max per tensor, as the bench's ``budget-as-*`` precisions),
and evaluates every pack: individual accuracy (θ_pre + τ̂_t per task) and task arithmetic
(λ = 0.3, the benchmark's fixed value). Then per pack the proxies an allocation could use: plain
squared error, Fisher-weighted error (``--fisher``), the |τ|-weighted sign agreement of τ̂ with
τ, and the share of zeros in τ̂; and their Spearman rank correlation with each accuracy:

    python benchmarks/allocation_anchor.py --run ~/.cache/tvq/bench/runs/ci --out /tmp/anchor-text --fisher [--fisher-allocation]

Prints two Markdown tables. Packs whose codes equal a fixed scheme's are evaluated once; the
accuracies are kept in ``OUT/accuracy.json``, so a rerun only recomputes the proxies.

``--estimates`` instead checks the allocation's pricing (issue 15, part 2): it analyses the run with
the bench's ``budget-*`` options (RTVQ + EC, MSE grid; candidate anchors across families), writes
the named fixed schemes as the anchored allocation would write them, and prints each one's estimate
beside its measured size on disk (``--entropy max`` for the optimal parser):

    python benchmarks/allocation_anchor.py --run RUN --out DIR --estimates ["TVQ INT2,TVQ INT3,RTVQ B3O2"]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tvq.bench.evaluate import BenchRun, open_run, read_state_dict
from tvq.bench.fisher import diagonal_fisher
from tvq.encode import budget as allocation_budget
from tvq.encode.budget import quantize_within_budget
from tvq.encode.options import QuantizeOptions
from tvq.encode.pipeline import quantize
from tvq.merge import merge_state_dict
from tvq.pack.reader import open_pack
from tvq.report import pack_summary
from tvq.vector import TaskVector

LAMBDA = 0.3


def codes_of(folder: Path) -> dict[tuple[str, str], str]:
    """(task file, tensor) -> sha256 of the stored bytes, from the manifest."""
    m = json.loads((folder / "manifest.json").read_text())
    return {(f, k): e["sha256"] for f, fe in m["files"].items() for k, e in fe["tensors"].items()}


def build(run: BenchRun, out: Path, fisher: dict[str, float] | None) -> list[tuple[str, str, Path]]:
    """(budget, allocation, pack) for the fixed schemes and every allocated pack (with ``fisher``,
    also the anchored one whose upgrades weigh each tensor's error by it)."""
    finetuned = {t: run.finetuned_path(t) for t in run.tasks}
    rows = []
    for b in (2, 3):
        path = out / f"tvq{b}"
        if not (path / "manifest.json").is_file():
            quantize(run.pretrained_path, finetuned, path, QuantizeOptions(bits=b), progress=False, overwrite=True)
        rows.append((f"TVQ INT{b}", "fixed", path))
    s2, s3 = (pack_summary(out / f"tvq{b}")["total_bytes"] for b in (2, 3))
    budgets = {"as-tvq2": s2, "1/3": s2 + (s3 - s2) // 3, "2/3": s2 + 2 * (s3 - s2) // 3, "as-tvq3": s3}
    for name, size in budgets.items():
        for allocation in ("free", "anchored", *(("anchored, Fisher",) if fisher is not None else ())):
            path = out / f"{name.replace('/', '_')}-{allocation.replace(', ', '-')}"
            if not (path / "manifest.json").is_file():
                quantize_within_budget(run.pretrained_path, finetuned, path, QuantizeOptions(bits=2, quantizer="mse"), budget_bytes=size,
                                       allocation=allocation.split(",")[0], sensitivity=fisher if "Fisher" in allocation else None,
                                       progress=False, overwrite=True)  # fmt: skip
            rows.append((f"{name} ({size / 1e6:.2f} MB)", allocation, path))
    return rows


def proxies(vectors: dict[str, TaskVector], exact: dict[str, TaskVector], fisher: dict[str, float] | None) -> dict[str, float]:
    """Over the quantized tensors (those the pack does not store exactly); sign agreement is the
    share of ‖τ‖₁ whose sign τ̂ keeps (a zero keeps none: where τ̂ ≠ 0 rounding never flips it)."""
    err = weighted = agree = norm1 = zeros = numel = 0.0
    for t, tv in vectors.items():
        for key, tau in exact[t].items():
            hat = tv[key]
            if torch.equal(hat, tau):
                continue
            e = float((hat - tau).pow(2).sum())
            err += e
            weighted += e * (fisher or {}).get(key, 1.0)
            mass = tau.abs()
            agree += float((mass * (torch.sign(hat) == torch.sign(tau))).sum())
            norm1 += float(mass.sum())
            zeros += float((hat == 0).sum())
            numel += hat.numel()
    out = {"error": err, "sign agreement": agree / max(norm1, 1e-30), "zeros": zeros / max(numel, 1)}
    if fisher is not None:
        out["Fisher error"] = weighted
    return out


def accuracies(run: BenchRun, vectors: dict[str, TaskVector], merged: bool) -> dict[str, float]:
    pre = read_state_dict(run.pretrained_path)
    acc = []
    for t in run.tasks:
        state = {k: (v.float() + vectors[t][k]).to(v.dtype) if k in vectors[t] else v for k, v in pre.items()}
        acc.append(run.evaluate_all(state, tasks=[t])[t])
    out = {"individual": 100 * sum(acc) / len(acc)}
    if merged:
        scores = run.evaluate_all(merge_state_dict("task_arithmetic", run.pretrained_path, vectors, {"lambda": LAMBDA}))
        out["task arithmetic"] = 100 * sum(scores.values()) / len(scores)
    return out


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def fisher_of(run: BenchRun, path: Path) -> dict[str, float]:
    """The run's per-tensor diagonal Fisher, computed once and kept in ``path``."""
    if not path.is_file():
        path.write_text(json.dumps(diagonal_fisher(run, progress=False)))
    return json.loads(path.read_text())


def within_budgets(rows: list[tuple[str, str, Path]], scores: dict[str, dict[str, float]], proxy: str, target: str) -> str:
    """At each budget, does the allocation with the larger proxy value have the higher accuracy?
    Counted as agree/disagree over the budgets where both differ."""
    agree = disagree = 0
    for budget in dict.fromkeys(b for b, a, _ in rows if a != "fixed"):
        pair = [scores[p.name] for allocation in ("free", "anchored") for b, a, p in rows if b == budget and a == allocation]
        d_proxy, d_acc = pair[1][proxy] - pair[0][proxy], pair[1][target] - pair[0][target]
        if d_proxy and d_acc:
            agree, disagree = agree + ((d_proxy > 0) == (d_acc > 0)), disagree + ((d_proxy > 0) != (d_acc > 0))
    return f"{agree}/{agree + disagree}"


def estimates(run: BenchRun, out: Path, names: list[str], entropy: str) -> None:
    """Estimate vs written bytes of fixed schemes, as the anchored allocation prices and writes them."""
    finetuned = {t: run.finetuned_path(t) for t in run.tasks}
    options = QuantizeOptions(residual=True, base_bits=3, bits=2, error_correction=True, quantizer="mse", entropy=entropy).validated()  # type: ignore[arg-type]
    table, fixed, n_params = allocation_budget.analyse(run.pretrained_path, finetuned, options, progress=False, cross=True)
    found = {a.name: a for a in allocation_budget.anchors(table, options)}
    per = 8 / (n_params * len(finetuned))
    print(f"exact tensors, headers and files (estimate): {fixed:,} bytes\n")
    print("| fixed scheme | estimate (bytes) | written (bytes) | estimate / written | bits/param written |\n|---|---|---|---|---|")
    for name in names:
        anchor = found[name]
        path = out / f"est-{entropy}-{name.replace(' ', '_').replace('[', '').replace(']', '')}"
        if not (path / "manifest.json").is_file():
            quantize(run.pretrained_path, finetuned, path, allocation_budget.fixed_scheme(options, anchor), progress=False, overwrite=True)
        written = pack_summary(path)["total_bytes"]
        estimate = fixed + anchor.nbytes
        print(f"| {name} | {estimate:,} | {written:,} | {estimate / written - 1:+.1%} | {written * per:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a benchmark run folder (tvq bench build)")
    parser.add_argument("--out", type=Path, required=True, help="where the packs go")
    parser.add_argument("--fisher", action="store_true", help="also the Fisher-weighted error (diagonal Fisher on validation data)")
    parser.add_argument("--no-merge", action="store_true", help="individual accuracy only")
    parser.add_argument("--fisher-allocation", action="store_true", help="with --fisher: also allocate anchored with Fisher sensitivity")
    parser.add_argument(
        "--estimates",
        nargs="?",
        const="TVQ INT2,TVQ INT3,RTVQ B3O2,RTVQ B2O1 [mse]",
        default=None,
        help="instead: estimate vs written bytes of these fixed schemes (comma-separated, as `tvq info` names them)",
    )
    parser.add_argument("--entropy", default="auto", choices=("auto", "max"), help="with --estimates: the packs' entropy coding")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = open_run(args.run)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.estimates is not None:
        estimates(run, args.out, args.estimates.split(","), args.entropy)
        return
    fisher = fisher_of(run, args.out / "fisher.json") if args.fisher else None
    exact = {t: TaskVector.from_checkpoints(run.pretrained_path, run.finetuned_path(t), name=t) for t in run.tasks}
    rows = build(run, args.out, fisher if args.fisher_allocation else None)
    cache = json.loads((args.out / "accuracy.json").read_text()) if (args.out / "accuracy.json").is_file() else {}  # pack -> accuracy
    seen: dict[frozenset, dict[str, float]] = {}
    results = []
    scores = {}  # pack folder -> its accuracies and proxies
    print("| budget | allocation | MB on disk | same codes as | individual (%) | task arithmetic (%) |\n|---|---|---|---|---|---|")
    for budget, allocation, path in rows:
        codes = frozenset(codes_of(path).items())
        same = next((n for n, (_, _, p) in zip(range(2), rows, strict=False) if codes == frozenset(codes_of(p).items())), None)
        if codes not in seen:
            vectors = open_pack(path, run.pretrained_path).task_vectors()
            if path.name not in cache:
                cache[path.name] = accuracies(run, vectors, not args.no_merge)
                (args.out / "accuracy.json").write_text(json.dumps(cache, indent=1))
            seen[codes] = {**cache[path.name], **proxies(vectors, exact, fisher)}
            results.append(seen[codes])
        r = scores[path.name] = seen[codes]
        fixed = f"TVQ INT{same + 2}" if same is not None and allocation != "fixed" else ""
        ta = f"{r['task arithmetic']:.1f}" if "task arithmetic" in r else "–"
        print(f"| {budget} | {allocation} | {pack_summary(path)['total_bytes'] / 1e6:.2f} | {fixed} | {r['individual']:.1f} | {ta} |", flush=True)
    targets = [m for m in ("individual", "task arithmetic") if m in results[0]]
    names = [n for n in ("error", "Fisher error", "sign agreement", "zeros") if n in results[0]]
    print(f"\nSpearman rank correlation over the {len(results)} distinct packs\n")
    print("| proxy | " + " | ".join(targets) + " |\n|---|" + "---|" * len(targets))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{spearman([r[n] for r in results], [r[m] for r in results]):+.2f}" for m in targets) + " |")
    print("\nWithin each budget (free vs anchored): budgets where the larger proxy value has the higher accuracy\n")
    print("| proxy | " + " | ".join(targets) + " |\n|---|" + "---|" * len(targets))
    for n in names:
        print(f"| {n} | " + " | ".join(within_budgets(rows, scores, n, m) for m in targets) + " |")
    (args.out / "anchor_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
