"""Side-by-side benchmarks: unclip vs DALLE2-pytorch vs diffusers on workloads W1-W4 (see common.py).

    python benchmarks/run.py                          # all implementations whose env exists, 3 rounds
    python benchmarks/run.py --json results.json      # also the machine-readable summary
    python benchmarks/run.py --quick --impl unclip    # tiny sizes, 1 round: checks the harness runs

Every measurement is a fresh process (`impl_<name>.py --workload W`, in the implementation's own virtual
environment), so imports, memory and thread pools never leak between implementations. Within a round the
implementations alternate (the order rotates every round); the reported value is the median over rounds.
Writes docs/BENCHMARKS.md (the "results" section) unless --quick (then only with --markdown).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402

WORKLOADS = ("W1", "W2", "W3", "W4")
METRICS = {"W1": ("images_per_s",), "W2": ("samples_per_s",), "W3": ("s_per_image",),
           "W4": ("s_per_image", "peak_rss_mib")}
HIGHER_IS_BETTER = {"images_per_s": True, "samples_per_s": True, "s_per_image": False, "peak_rss_mib": False}
DESCRIPTION = {"W1": "decoder training, 32 px, batch 32", "W2": "prior training, depth 6 width 256, batch 64",
               "W3": "decoder sampling, 8 images, 50 steps, CFG 3",
               "W4": "text -> 64 px, prior 25 + decoder 25 + upsampler 10 steps, 8 images"}
IMPLS = ("unclip", "dalle2-pytorch", "diffusers")
MODULES = {"unclip": "impl_unclip.py", "dalle2-pytorch": "impl_dalle2.py", "diffusers": "impl_diffusers.py"}

NOTES = (HERE / "compared.md").read_text()  # what is compared, and how the implementations differ


# ---------------------------------------------------------------- where each implementation runs


def main_env_has_diffusers_unclip() -> bool:
    return (importlib.util.find_spec("diffusers") is not None and
            importlib.util.find_spec("diffusers.pipelines.deprecated.unclip") is not None)


def interpreter(impl: str) -> str | None:
    """The python that runs an implementation, or None when its environment is missing."""
    envs = HERE / "envs"
    if impl == "unclip":
        return sys.executable
    if impl == "dalle2-pytorch":
        python = envs / "dalle2" / "bin" / "python"
        return str(python) if python.exists() else None
    if impl == "diffusers":
        python = envs / "diffusers" / "bin" / "python"
        if python.exists():
            return str(python)
        return sys.executable if main_env_has_diffusers_unclip() else None
    raise ValueError(impl)


def measure(impl: str, workload: str, args) -> dict:
    """One measurement: a fresh process (or this one with --inprocess for unclip); a dict with an error on failure."""
    if args.inprocess and impl == "unclip":
        import impl_unclip

        return impl_unclip.run(workload, args.quick, args.lever, args.threads)
    cmd = [interpreter(impl), str(HERE / MODULES[impl]), "--workload", workload]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    if impl == "unclip":
        for lever in args.lever:
            cmd += ["--lever", lever]
    env = dict(os.environ, TQDM_DISABLE="1")
    if impl != "unclip":
        env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "workload": workload, "error": f"timed out after {args.timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"impl": impl, "workload": workload, "error": f"exit {proc.returncode}: {' / '.join(tail)}"}
    rec = json.loads(lines[-1])
    rec["process_s"] = round(time.perf_counter() - start, 2)
    return rec


# ---------------------------------------------------------------- summary


def medians(records: list[dict]) -> dict:
    """{impl: {workload: {metric: median}}} over the successful rounds."""
    out: dict = {}
    for rec in records:
        if "error" in rec:
            continue
        for metric in METRICS[rec["workload"]]:
            out.setdefault(rec["impl"], {}).setdefault(rec["workload"], {}).setdefault(metric, []).append(
                rec["metrics"][metric])
    return {impl: {w: {m: statistics.median(v) for m, v in ms.items()} for w, ms in ws.items()}
            for impl, ws in out.items()}


def spread(records: list[dict], impl: str, workload: str, metric: str) -> tuple[float, float] | None:
    values = [r["metrics"][metric] for r in records if r.get("impl") == impl and r["workload"] == workload
              and "error" not in r]
    return (min(values), max(values)) if values else None


def slowdown(value: float, best: float, metric: str) -> float:
    """How many times worse than `best` (1.0 = the best)."""
    return best / value if HIGHER_IS_BETTER[metric] else value / best


def best_of(med: dict, impls, workload: str, metric: str) -> tuple[str, float] | None:
    found = [(i, med[i][workload][metric]) for i in impls if workload in med.get(i, {})]
    if not found:
        return None
    pick = max if HIGHER_IS_BETTER[metric] else min
    return pick(found, key=lambda x: x[1])


def summary_rows(records: list[dict], med: dict, impls: list[str]) -> list[list]:
    rows = []
    for w in WORKLOADS:
        for metric in METRICS[w]:
            best = best_of(med, impls, w, metric)
            peer = best_of(med, [i for i in impls if i != "unclip"], w, metric)
            for impl in impls:
                if w not in med.get(impl, {}):
                    errors = [r["error"] for r in records
                              if r.get("impl") == impl and r["workload"] == w and "error" in r]
                    if errors:
                        rows.append([w, metric, impl, "failed: " + errors[0][:80], "", "", ""])
                    continue
                value = med[impl][w][metric]
                lo, hi = spread(records, impl, w, metric)
                vs_peer = (f"{1 / slowdown(value, peer[1], metric):.2f}x ({peer[0]})"  # > 1: unclip is better
                           if peer and impl == "unclip" else "")
                rows.append([w, metric, impl, report.fmt(value), f"{report.fmt(lo)}–{report.fmt(hi)}",
                             f"{slowdown(value, best[1], metric):.2f}x", vs_peer])
    return rows


def params_rows(records: list[dict], impls: list[str]) -> list[list]:
    rows = []
    for impl in impls:
        seen = {}
        for rec in records:
            if rec.get("impl") == impl and "error" not in rec and rec["workload"] not in seen:
                seen[rec["workload"]] = rec["info"].get("params_m")
        if seen:
            rows.append([impl] + [json.dumps(seen.get(w)).replace('"', "") if seen.get(w) is not None else "–"
                                  for w in WORKLOADS])
    return rows


def versions_rows(records: list[dict], impls: list[str]) -> list[list]:
    rows = []
    for impl in impls:
        rec = next((r for r in records if r.get("impl") == impl and "versions" in r), None)
        if rec:
            rows.append([impl, ", ".join(f"{k} {v}" for k, v in rec["versions"].items() if v),
                         rec.get("threads", "–"), interpreter(impl)])
    return rows


def markdown(records: list[dict], med: dict, impls: list[str], machine: dict, args, wall: float) -> str:
    header = ["workload", "metric", "implementation", "median", f"min–max ({args.rounds} rounds)",
              "vs best (1.00x = best)", "unclip's advantage over the best peer (>1 = unclip better)"]
    parts = [
        "## Results" + (" (--quick: tiny sizes, timings meaningless)" if args.quick else ""),
        report.machine_markdown(machine),
        f"- command: `python benchmarks/run.py {' '.join(sys.argv[1:])}` ({wall / 60:.1f} min)",
        "",
        "Lower is better for s/image and MiB, higher for images/s and samples/s. \"vs best\" is how many times "
        "slower (or larger) than the best implementation on that line.",
        "",
        report.table(header, summary_rows(records, med, impls)),
        "",
        "Workloads: " + "; ".join(f"{w}: {d}" for w, d in DESCRIPTION.items()) + ".",
        "",
        "Parameters (millions) per workload:",
        "",
        report.table(["implementation", *WORKLOADS], params_rows(records, impls)),
        "",
        "Versions:",
        "",
        report.table(["implementation", "packages", "torch threads", "python"], versions_rows(records, impls)),
        "",
        NOTES,
    ]
    return "\n".join(parts)


def summary_json(med: dict, records: list[dict], machine: dict, args) -> dict:
    out = {"workloads": med.get("unclip", {}),
           "peers": {impl: {"workloads": med[impl]} for impl in med if impl != "unclip"},
           "meta": {"machine": machine, "quick": args.quick, "rounds": args.rounds, "levers": args.lever,
                    "records": records}}
    return out


def print_table(records, med, impls) -> None:
    for row in summary_rows(records, med, impls):
        print("  ".join(f"{c:<14}" if i < 3 else str(c) for i, c in enumerate(row)))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 round: checks that everything runs")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="implementations (default: every available)")
    parser.add_argument("--workload", action="append", choices=WORKLOADS, help="workloads (default: all)")
    parser.add_argument("--json", type=Path, help="write the summary JSON here")
    parser.add_argument("--markdown", type=Path, help=f"results file (default {report.DEFAULT_MARKDOWN}, "
                        "not written with --quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every process (0: torch's default)")
    parser.add_argument("--lever", action="append", default=[], help="unclip levers (impl_unclip.py LEVERS)")
    parser.add_argument("--inprocess", action="store_true", help="run unclip in this process (tests)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main() -> None:
    args = parse_args()
    wanted = args.impl or list(IMPLS)
    impls = [i for i in wanted if interpreter(i) is not None]
    for missing in sorted(set(wanted) - set(impls)):
        print(f"skipping {missing}: no environment (run benchmarks/setup_peers.sh)", file=sys.stderr)
    workloads = args.workload or list(WORKLOADS)
    machine = report.machine()
    start, records = time.perf_counter(), []
    for r in range(args.rounds):
        for w in workloads:
            order = impls[r % len(impls):] + impls[:r % len(impls)]  # alternate who goes first
            for impl in order:
                rec = measure(impl, w, args)
                rec["round"] = r
                records.append(rec)
                shown = rec.get("error") or ", ".join(f"{k} {report.fmt(v)}" for k, v in rec["metrics"].items())
                print(f"round {r + 1}/{args.rounds} {w} {impl:<15} {shown}", file=sys.stderr, flush=True)
    med = medians(records)
    print_table(records, med, impls)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary_json(med, records, machine, args), indent=1))
    if args.markdown or not args.quick:
        path = report.update_section("results", markdown(records, med, impls, machine, args,
                                                         time.perf_counter() - start), args.markdown)
        print(f"wrote {path}", file=sys.stderr)
    if any("error" in r for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
