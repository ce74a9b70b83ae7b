"""Every method from every pack kind under a memory cap, with the uncapped run's bytes (issue 19).

For each (method, pack) of an existing LLM-benchmark workdir (``run.py`` made the models and
packs), ``tvq merge`` runs twice in fresh processes with a warm page cache, as ``run.py`` runs
its steps: once uncapped, once inside a cgroup-v1 memory group capped at ``--cap``. The table
says whether the capped run finished, its cgroup peak, and whether every output file has the
uncapped run's sha256. Needs root (the cgroup)::

    python benchmarks/llm/capped_methods.py --workdir /work/bench_llm --cap 1GiB \\
        --methods ta ties emr consensus --packs tvq4 tvq2 rtvq_b3o2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as llm  # noqa: E402  (benchmarks/llm/run.py: steps, cgroup and measurement)

METHODS: dict[str, list[str]] = {
    "ta": ["--method", "task_arithmetic", "--lambda", str(llm.LAMBDA)],
    "ties": ["--method", "ties", "--density", str(llm.DENSITY), "--lambda", str(llm.LAMBDA), "--scope", "tensor"],
    "ties_global": ["--method", "ties", "--density", str(llm.DENSITY), "--lambda", str(llm.LAMBDA)],
    "emr": ["--method", "emr", "--task", "ft0"],
    "consensus": ["--method", "consensus", "--lambda", str(llm.LAMBDA)],
}


def step(workdir: Path, method: str, pack: str, threads: int) -> llm.Step:
    output = workdir / "out" / f"capped_{method}_{pack}"
    cmd = ["tvq", "merge", "--pack", str(workdir / "packs" / pack), "-p", str(workdir / "models" / "base"), "-o", str(output),
           "--max-shard-size", "2GB", "--overwrite", "--no-progress", "--threads", str(threads), *METHODS[method]]  # fmt: skip
    inputs = [workdir / "packs" / pack, workdir / "models" / "base"]
    return llm.Step(f"{method}_{pack}", "merge", f"tvq merge {method} ← {pack}", output, cmd, inputs, method=method, pack=pack, cappable=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--cap", type=llm.parse_size, default=llm.parse_size("1GiB"))
    p.add_argument("--methods", nargs="+", default=["ta", "ties", "emr", "consensus"], choices=list(METHODS))
    p.add_argument("--packs", nargs="+", default=["tvq4", "tvq2", "rtvq_b3o2"])
    p.add_argument("--pairs", nargs="+", default=None, metavar="METHOD:PACK", help="only these (method, pack) pairs, e.g. ties:tvq2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default WORKDIR/capped-methods.json)")
    args = p.parse_args()
    logs = args.workdir / "logs" / "capped-methods"
    logs.mkdir(parents=True, exist_ok=True)
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    cgroup = llm.Cgroup(args.cap)
    rows = []
    out = args.out or args.workdir / "capped-methods.json"
    pairs = [tuple(p.split(":", 1)) for p in args.pairs] if args.pairs else [(m, k) for k in args.packs for m in args.methods]
    try:
        for method, pack in pairs:
            if method not in METHODS:
                raise SystemExit(f"unknown method {method!r} (one of {', '.join(METHODS)})")
            s = step(args.workdir, method, pack, args.threads)
            print(f"[{s.name}] {s.label}", flush=True)
            free = llm.run_step(s, cgroup=None, cache="warm", log_dir=logs, hash_outputs=True, env=env)
            capped = llm.run_step(s, cgroup=cgroup, cache="warm", log_dir=logs, hash_outputs=True, env=env)
            same = free.rc == 0 and capped.rc == 0 and free.files == capped.files
            rows.append({"method": method, "pack": pack, "wall_s": free.wall_s, "cpu_s": (free.user_s or 0) + (free.sys_s or 0),
                         "anon_mib": free.peak_anon_mib, "capped_rc": capped.rc, "capped_wall_s": capped.wall_s,
                         "cgroup_peak_mib": capped.cgroup_peak_mib, "oom_kills": capped.cgroup_oom_kills, "identical": same})  # fmt: skip
            print(f"    capped rc {capped.rc}; outputs {'identical' if same else 'DIFFER'} to the uncapped run", flush=True)
            shutil.rmtree(s.output, ignore_errors=True)
            out.write_text(json.dumps({"cap_bytes": args.cap, "rows": rows}, indent=1))  # after every pair: a long run can be stopped
    finally:
        cgroup.remove()
    cap = f"under {args.cap / 2**30:g} GiB"
    print(f"\n| method | pack | wall s | CPU s | peak anon MiB | {cap} | cgroup peak MiB | capped wall s | identical bytes |")
    print("|---|---|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        done = "completed" if r["capped_rc"] == 0 else f"**failed** (rc {r['capped_rc']}, OOM kills {r['oom_kills']})"
        print(f"| {r['method']} | {r['pack']} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} | {r['anon_mib']:.0f} | {done} | "
              f"{r['cgroup_peak_mib'] or 0:.0f} | {r['capped_wall_s']:.1f} | {'yes' if r['identical'] else 'no'} |")  # fmt: skip
    print(f"results: {out}")


if __name__ == "__main__":
    main()
