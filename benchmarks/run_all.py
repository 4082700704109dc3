"""Run every benchmark of issue 6 (backends, e2e_upstream, scaling, hwlimit), each in its own process.

    python benchmarks/run_all.py            # full set, results to benchmarks/results/ (< 10 min on 2 cores)
    python benchmarks/run_all.py --quick    # smoke test: tiny inputs, results to a temp folder (or --out)

After the runs it checks that every result file is complete and well-formed (:func:`check_result`) and
prints each benchmark's targets. Exit status 1 when a benchmark failed or a result is malformed; missed
targets are reported, not failures (numbers on shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("backends", "e2e_upstream", "scaling", "hwlimit")
REQUIRED = ("benchmark", "date", "machine", "versions", "parameters", "seconds")


def check_result(name: str, doc: dict[str, Any]) -> list[str]:
    """Problems of one result document: the common header, machine facts and the benchmark's own parts."""
    problems = [f"{name}: missing {k!r}" for k in REQUIRED if k not in doc]
    machine = doc.get("machine", {})
    for key in ("cpu_model", "cpu_count", "gpus", "load_average", "load_average_after"):
        if key not in machine:
            problems.append(f"{name}: machine lacks {key!r}")
    if "threads" not in doc.get("parameters", {}):
        problems.append(f"{name}: parameters lack 'threads'")
    if name == "backends":
        from embedseg_deploy.bench import validate_report

        reports = doc.get("reports", {})
        if set(reports) != {"2d", "3d"}:
            problems.append(f"{name}: expected 2d and 3d reports, got {sorted(reports)}")
        for key, report in reports.items():
            problems += [f"{name} {key}: {p}" for p in validate_report(report)]
            if not any(r["backend"].startswith("onnx-cpu") for r in report.get("results", [])):
                problems.append(f"{name} {key}: no onnx-cpu result")
            if not report.get("machine", {}).get("gpus") and not any(
                s["backend"] in ("onnx-cuda", "tensorrt") for s in report.get("skipped", [])
            ):
                problems.append(f"{name} {key}: no GPU and no skipped GPU backend with a reason")
    elif name == "e2e_upstream":
        cases = doc.get("cases") or []
        if not cases:
            problems.append(f"{name}: no cases")
        for c in cases:
            for side, s in c.get("sides", {}).items():
                if not _positive(s.get("total_s", {}).get("median")):
                    problems.append(f"{name}: {c.get('image')} {side}: no positive total time")
        if "non_network" not in doc.get("targets", {}):
            problems.append(f"{name}: no non-network target")
        if doc.get("upstream_skipped") is None and "speedup" not in doc.get("targets", {}):
            problems.append(f"{name}: upstream ran but no speed-up reported")
    elif name == "scaling":
        rows = doc.get("rows") or []
        if {r.get("ndim") for r in rows} != {2, 3}:
            problems.append(f"{name}: rows must cover 2D and 3D")
        for r in rows:
            if not _positive(r.get("compute_s", {}).get("median")) or not _positive(r.get("peak_rss_mib")):
                problems.append(f"{name}: {r.get('shape')} lacks time or peak RSS")
        if "targets" not in doc:
            problems.append(f"{name}: no targets")
    elif name == "hwlimit":
        if not _positive(doc.get("sgemm_gflops", {}).get("median")):
            problems.append(f"{name}: no sgemm rate")
        for f in doc.get("flops", []):
            if not _positive(f.get("onnx_conv_flops", {}).get("total")):
                problems.append(f"{name}: FLOPs not counted for {f.get('tile')}")
        if not doc.get("summary") or not doc.get("ort_profiles") or "best" not in doc:
            problems.append(f"{name}: summary, profiles or best missing")
    return problems


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def targets_line(name: str, doc: dict[str, Any]) -> str:
    """The benchmark's targets in one line."""
    if name == "e2e_upstream":
        t = doc.get("targets", {})
        parts = []
        if "speedup" in t:
            parts.append(f"speed-up {t['speedup']['measured']:.2f}x (target {t['speedup']['target']:.0f}x)")
        else:
            parts.append(f"upstream skipped ({doc.get('upstream_skipped')})")
        parts.append(f"worst non-network share {t['non_network']['worst_median']:.1%} (target <= 15%)")
        return "; ".join(parts)
    if name == "scaling":
        t = doc["targets"]
        return (
            f"log-log slopes {t['linear']['slopes']} (linear: {t['linear']['met']}); 3D "
            f"{t['rss_3d_largest']['shape']} peak RSS {t['rss_3d_largest']['peak_rss_mib']} MiB (<= 1907 MiB)"
        )
    if name == "hwlimit":
        return "; ".join(
            f"{k}D best {v['config']} {v['fraction']:.0%} of sgemm (>= 70%)" for k, v in doc["best"].items()
        )
    if name == "backends":
        out = []
        for key, report in doc["reports"].items():
            best = min(report["results"], key=lambda r: r["latency_s"]["p50"])
            out.append(f"{key} fastest {best['backend']} {best['latency_s']['p50']:.2f} s/image")
        return "; ".join(out)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test with tiny inputs")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder [benchmarks/results; quick: temp]"
    )
    parser.add_argument("--no-upstream", action="store_true", help="e2e_upstream without the upstream side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-quick-") as tmp:
        out = args.out or (Path(tmp) if args.quick else HERE / "results")
        failed = run(args.only, out, args.quick, args.no_upstream)
    sys.exit(1 if failed else 0)


def run(names: list[str], out: Path, quick: bool, no_upstream: bool = False) -> int:
    """Run ``names`` into ``out``; returns the number of failures (crashed or malformed results)."""
    failed = 0
    t_all = time.perf_counter()
    for name in names:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--out", str(out)]
        if quick:
            cmd.append("--quick")
        if no_upstream and name == "e2e_upstream":
            cmd.append("--no-upstream")
        t0 = time.perf_counter()
        print(f"== {name}: {' '.join(cmd[1:])} (load {os.getloadavg()[0]:.1f})", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        result = out / f"{name}{'_quick' if quick else ''}.json"
        if proc.returncode != 0:
            failed += 1
            print(f"   FAILED after {seconds:.0f} s:\n{proc.stderr[-3000:]}", flush=True)
            continue
        doc = json.loads(result.read_text())
        problems = check_result(name, doc)
        if not result.with_suffix(".md").is_file():
            problems.append(f"{name}: markdown missing")
        if problems:
            failed += 1
            print("   MALFORMED: " + "; ".join(problems), flush=True)
        print(f"   {seconds:.0f} s; {targets_line(name, doc)}", flush=True)
    print(
        f"== all done in {time.perf_counter() - t_all:.0f} s; {failed} failure(s); results in {out}",
        flush=True,
    )
    return failed


if __name__ == "__main__":
    main()
