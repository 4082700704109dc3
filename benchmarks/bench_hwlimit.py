"""The hardware limit: the network's counted FLOPs per tile against the machine's fp32 matmul rate.

* FLOPs per tile are COUNTED: every Conv/ConvTranspose node of the exported ONNX graph with its shapes
  from ONNX shape inference (:func:`embedseg_deploy.bench.conv_flops`), cross-checked with
  ``torch.utils.flop_counter.FlopCounterMode`` on the torch model (upstream's BranchedERFNet).
* The reference rate is numpy's fp32 matrix multiply (OpenBLAS sgemm, 2048^3, the same 2 threads),
  measured right before and right after every configuration's calls; torch's ``mm`` is reported beside it.
* On a shared machine other processes only ever slow a call down, so both sides are "best of" estimates
  of what the hardware does: the network's fastest of ``--runs`` calls, the faster sgemm (of 2 + 2
  products) around it. The achieved fraction ``(FLOPs / time) / sgemm rate`` is taken per round; rounds
  repeat everything; medians and [min, max] over rounds.
* Configurations: torch eager (upstream's network, ``OMP_WAIT_POLICY=PASSIVE``); ONNX Runtime CPU with
  the session options that matter (graph optimisation ALL = with the NCHWc layout transformer,
  EXTENDED, BASIC; ``session.intra_op.allow_spinning`` 1/0; memory pattern on/off); and tile sizes.
* Where the time goes: ONNX Runtime's profiling JSON summed per op type (and the conv kernels' own rate),
  torch's profiler per aten op.

    python benchmarks/bench_hwlimit.py [--quick] [--rounds 3] [--out benchmarks/results]

Results: ``hwlimit.json`` and ``hwlimit.md``.
"""

from __future__ import annotations

import _common

_ENV = _common.pin_threads()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from embedseg_deploy.bench import conv_flops  # noqa: E402
from embedseg_deploy.bench_report import median_spread  # noqa: E402

NAME = "hwlimit"
TARGET = 0.70
SGEMM_N = 2048
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
}
# (name, graph optimisation level, allow_spinning, memory pattern)
ORT_CONFIGS = [
    ("ort all, spin on (ORT default)", "all", "1", True),
    ("ort all, spin off", "all", "0", True),
    ("ort all, spin off, no mem pattern", "all", "0", False),
    ("ort extended (no NCHWc), spin off", "extended", "0", True),
    ("ort basic, spin off", "basic", "0", True),
]


def sgemm_rate(n: int = SGEMM_N, repeats: int = 3) -> float:
    """Best numpy (OpenBLAS) fp32 matmul rate in GFLOP/s over ``repeats`` products of n x n matrices."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def torch_mm_rate(n: int = SGEMM_N, repeats: int = 3) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def ort_session(
    model: Path, threads: int, level: str, spin: str, mem_pattern: bool, profile: Path | None = None
):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = LEVELS[level]
    opts.enable_mem_pattern = mem_pattern
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.log_severity_level = 3
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Any:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torch_runner(model: torch.nn.Module) -> Any:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def time_run(run, x: np.ndarray, repeats: int) -> float:
    """Best seconds of ``repeats`` calls (after the configuration's warm-up): on a shared machine other
    processes only ever slow a call down, so the fastest call is the closest to what the hardware does."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        best = min(best, time.perf_counter() - t0)
    return float(best)


def torch_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(shape))
    return int(counter.get_total_flops())


def ort_profile(
    model: Path, threads: int, config: tuple, x: np.ndarray, runs: int, conv_gflop: float, folder: Path
) -> dict[str, Any]:
    """Kernel time per op type from ONNX Runtime's profiling JSON, for the fastest of ``runs`` runs after a
    warm-up (the least disturbed one on a shared machine), and the conv kernels' own rate."""
    _, level, spin, mem = config
    session = ort_session(model, threads, level, spin, mem, profile=folder / "ort")
    run = ort_runner(session)
    for _ in range(runs + 1):
        run(x)
    events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[1:]
    fastest = min(model_runs, key=lambda e: e["dur"])
    lo, hi = fastest["ts"], fastest["ts"] + fastest["dur"]
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e6
    total = sum(per_op.values())
    conv_s = sum(v for k, v in per_op.items() if "Conv" in k)
    return {
        "config": config[0],
        "tile": list(x.shape),
        "runs": runs,
        "wall_s": fastest["dur"] / 1e6,
        "wall_all_runs_s": [e["dur"] / 1e6 for e in model_runs],
        "kernel_sum_s": total,
        "per_op_type_s": dict(sorted(per_op.items(), key=lambda kv: -kv[1])),
        "conv_kernels_s": conv_s,
        "conv_kernels_gflops": conv_gflop / conv_s if conv_s else None,
        "non_conv_share": 1 - conv_s / total if total else None,
    }


def torch_profile(model: torch.nn.Module, x: np.ndarray, runs: int) -> dict[str, float]:
    """Self CPU time per aten op (seconds per run, mean over ``runs``), top 12."""
    from torch.profiler import ProfilerActivity, profile

    xt = torch.from_numpy(x)
    with torch.inference_mode():
        model(xt)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(xt)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {r.key: r.self_cpu_time_total / 1e6 / runs for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tiles, 1 round (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed calls per configuration per round")
    parser.add_argument("--threads", type=int, default=_common.THREADS)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiles = {2: [(512, 512), (256, 256)], 3: [(32, 128, 128), (64, 128, 128), (32, 64, 64)]}
    if args.quick:
        args.rounds, args.runs = 1, 1
        tiles = {2: [(128, 128)], 3: [(16, 64, 64)]}
    doc = _common.header(NAME, args.threads, rounds=args.rounds, runs=args.runs, sgemm_n=SGEMM_N, tiles=tiles)
    from embedseg_training.checkpoint import load_model

    setups = []  # (label, ndim, tile, runner, flops)
    flops_doc = []
    for ndim in (2, 3):
        onnx_model = _common.exported_model(ndim, "fp32")
        net, _ = load_model(_common.fixture_checkpoint(ndim))
        net.eval()
        for i, tile in enumerate(tiles[ndim]):
            shape = (1, 1, *tile)
            counted = conv_flops(onnx_model, shape)
            by_torch = torch_flops(net, shape)
            mpx = np.prod(tile) / 1e6
            flops_doc.append(
                {
                    "ndim": ndim,
                    "tile": list(tile),
                    "onnx_conv_flops": counted,
                    "torch_flop_counter": by_torch,
                    "gflop_per_mpx": counted["total"] / 1e9 / mpx,
                    "torch_gflop_per_mpx": by_torch / 1e9 / mpx,
                }
            )
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            configs = ORT_CONFIGS if i == 0 else ORT_CONFIGS[:2]  # options on the first tile, sizes on two
            if args.quick:
                configs = ORT_CONFIGS[:2]
            setups.append(("torch eager", ndim, tile, torch_runner(net), counted["total"], x))
            for cfg in configs:
                session = ort_session(onnx_model, args.threads, *cfg[1:])
                setups.append((cfg[0], ndim, tile, ort_runner(session), counted["total"], x))
    for _, _, _, run, _, x in setups:  # warm-up
        run(x)
    rounds = []
    for r in range(args.rounds):
        row = {"torch_mm_gflops": torch_mm_rate(), "configs": []}
        for label, ndim, tile, run, flops, x in setups:
            before = sgemm_rate(repeats=2)
            seconds = time_run(run, x, args.runs)
            reference = max(before, sgemm_rate(repeats=2))  # the best sgemm right before and after
            gflops = flops / 1e9 / seconds
            row["configs"].append(
                {
                    "config": label,
                    "ndim": ndim,
                    "tile": list(tile),
                    "seconds": seconds,
                    "gflops": gflops,
                    "sgemm_gflops": reference,
                    "fraction_of_sgemm": gflops / reference,
                }
            )
        row["sgemm_gflops"] = max(c["sgemm_gflops"] for c in row["configs"])
        rounds.append(row)
        _common.log(
            f"round {r + 1}: sgemm {row['sgemm_gflops']:.0f} GFLOP/s; "
            + ", ".join(f"{c['config']} {c['ndim']}D {c['fraction_of_sgemm']:.0%}" for c in row["configs"])
        )
    summary = []
    for i, (label, ndim, tile, *_rest) in enumerate(setups):
        summary.append(
            {
                "config": label,
                "ndim": ndim,
                "tile": list(tile),
                "seconds": median_spread([rw["configs"][i]["seconds"] for rw in rounds]),
                "gflops": median_spread([rw["configs"][i]["gflops"] for rw in rounds]),
                "fraction_of_sgemm": median_spread([rw["configs"][i]["fraction_of_sgemm"] for rw in rounds]),
            }
        )
    doc["flops"] = flops_doc
    doc["sgemm_gflops"] = median_spread([rw["sgemm_gflops"] for rw in rounds])
    doc["torch_mm_gflops"] = median_spread([rw["torch_mm_gflops"] for rw in rounds])
    doc["summary"] = summary
    doc["rounds"] = rounds
    best_ort = max(
        (s for s in summary if s["config"].startswith("ort") and s["tile"] == list(tiles[2][0])),
        key=lambda s: s["fraction_of_sgemm"]["median"],
    )
    cfg = next(c for c in ORT_CONFIGS if c[0] == best_ort["config"])
    with tempfile.TemporaryDirectory(prefix="bench-hwlimit-") as tmp:
        profiles = []
        for ndim in (2, 3):
            tile = tiles[ndim][0]
            x = np.random.default_rng(0).random((1, 1, *tile), dtype=np.float32)
            gflop = next(f for f in flops_doc if f["ndim"] == ndim and f["tile"] == list(tile))[
                "onnx_conv_flops"
            ]
            profiles.append(
                {
                    "ndim": ndim,
                    **ort_profile(
                        _common.exported_model(ndim),
                        args.threads,
                        cfg,
                        x,
                        args.runs + 1,
                        gflop["total"] / 1e9,
                        Path(tmp),
                    ),
                    "conv_transpose_flop_share": gflop["conv_transpose"] / gflop["total"],
                }
            )
            p = profiles[-1]
            ct = p["per_op_type_s"].get("ConvTranspose", 0.0)
            p["conv_transpose_time_share"] = ct / p["kernel_sum_s"]
            p["conv_transpose_gflops"] = gflop["conv_transpose"] / 1e9 / ct if ct else None
            p["conv_only_gflops"] = gflop["conv"] / 1e9 / (p["conv_kernels_s"] - ct)
    doc["ort_profiles"] = profiles
    net2, _ = load_model(_common.fixture_checkpoint(2))
    x = np.random.default_rng(0).random((1, 1, *tiles[2][0]), dtype=np.float32)
    doc["torch_profile_2d"] = torch_profile(net2.eval(), x, args.runs + 1)
    best = {}
    for ndim in (2, 3):
        cpu = [s for s in summary if s["ndim"] == ndim]
        top = max(cpu, key=lambda s: s["fraction_of_sgemm"]["median"])
        best[str(ndim)] = {
            "config": top["config"],
            "tile": top["tile"],
            "fraction": top["fraction_of_sgemm"]["median"],
            "target": TARGET,
            "met": top["fraction_of_sgemm"]["median"] >= TARGET,
        }
    doc["best"] = best
    print(_common.finish(doc, markdown, NAME if not args.quick else NAME + "_quick", args.out))


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Hardware limit: counted network FLOPs vs the measured fp32 matmul rate",
        "",
        _common.machine_line(doc),
        f"Reference: numpy/OpenBLAS sgemm {SGEMM_N}^3, {doc['parameters']['threads']} threads: "
        f"{_ms(doc['sgemm_gflops'], '.0f')} GFLOP/s (median [min, max] over rounds); torch mm "
        f"{_ms(doc['torch_mm_gflops'], '.0f')} GFLOP/s. This reference is what numpy's BLAS reaches here "
        "with the same threads on a shared machine, not the CPU's peak: fractions above 100 % mean the "
        "network's convolution kernels ran faster than this sgemm.",
        "",
        "FLOPs (2 per multiply-add) of Conv + ConvTranspose, counted on the ONNX graph with shape inference; "
        "torch's FlopCounterMode on the same tile for comparison:",
        "",
        "| ndim | tile | conv GFLOP | conv-transpose GFLOP | GFLOP per M(px/vox) | torch counter GFLOP/M |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for f in doc["flops"]:
        c = f["onnx_conv_flops"]
        lines.append(
            f"| {f['ndim']}D | {'x'.join(map(str, f['tile']))} | {c['conv'] / 1e9:.2f} | "
            f"{c['conv_transpose'] / 1e9:.2f} | {f['gflop_per_mpx']:.1f} | {f['torch_gflop_per_mpx']:.1f} |"
        )
    lines += [
        "",
        f"Achieved rate per configuration ({doc['parameters']['rounds']} rounds; per round the fastest of "
        f"{doc['parameters']['runs']} calls against the faster sgemm right before/after it; "
        "medians [min, max] over rounds):",
        "",
        "| ndim | tile | configuration | s per tile | GFLOP/s | fraction of sgemm [min, max] |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for s in doc["summary"]:
        fr = s["fraction_of_sgemm"]
        lines.append(
            f"| {s['ndim']}D | {'x'.join(map(str, s['tile']))} | {s['config']} | "
            f"{s['seconds']['median']:.3f} | "
            f"{s['gflops']['median']:.0f} | {fr['median']:.0%} [{fr['min']:.0%}, {fr['max']:.0%}] |"
        )
    lines += [
        "",
        "Where ONNX Runtime's time goes (profiling JSON, kernel time per op type in the fastest run):",
        "",
    ]
    for p in doc["ort_profiles"]:
        ops = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in list(p["per_op_type_s"].items())[:8])
        rate = p["conv_kernels_gflops"]
        lines.append(
            f"- {p['ndim']}D {'x'.join(map(str, p['tile'][2:]))}, {p['config']}: "
            f"wall {p['wall_s']:.3f} s (fastest of {p['runs']}), "
            f"kernels {p['kernel_sum_s']:.3f} s; conv kernels {p['conv_kernels_s']:.3f} s = "
            f"{rate:.0f} GFLOP/s; non-conv ops {p['non_conv_share']:.0%}; ConvTranspose "
            f"{p['conv_transpose_time_share']:.0%} of the kernel time for "
            f"{p['conv_transpose_flop_share']:.0%} of the FLOPs (Conv {p['conv_only_gflops']:.0f} GFLOP/s, "
            f"ConvTranspose {p['conv_transpose_gflops'] or 0:.0f} GFLOP/s). {ops}."
        )
    tp = doc["torch_profile_2d"]
    lines += [
        "",
        "torch eager, 2D, self CPU time per op per run: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in list(tp.items())[:8])
        + ".",
    ]
    lines += ["", "Target: the best CPU backend >= 70 % of the sgemm rate:", ""]
    for ndim, b in doc["best"].items():
        gap = (b["target"] - b["fraction"]) * 100
        verdict = "met" if b["met"] else f"MISSED by {gap:.0f} percentage point(s)"
        lines.append(
            f"- {ndim}D: {b['config']} on {'x'.join(map(str, b['tile']))}: {b['fraction']:.0%} -> {verdict}"
        )
    return "\n".join(lines) + "\n"


def _ms(stats: dict[str, Any], fmt: str) -> str:
    return f"{format(stats['median'], fmt)} [{format(stats['min'], fmt)}, {format(stats['max'], fmt)}]"


if __name__ == "__main__":
    main()
