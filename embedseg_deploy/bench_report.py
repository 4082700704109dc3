"""The benchmark report: latency statistics, the schema check, markdown and a plot, atomic result files.

Pure functions over the report dictionary that :func:`embedseg_deploy.bench.run_bench` makes; the
benchmark scripts in ``benchmarks/`` use them too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = 1
STAGES = ("read", "normalize", "tile", "h2d", "network", "d2h", "stitch", "decode", "cluster", "write")
LATENCY_KEYS = ("n", "p50", "p90", "p99", "mean", "min", "max")


def latency_stats(samples: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50/p90/p99 (linear interpolation), mean, min, max of ``samples`` in seconds."""
    x = np.asarray([float(s) for s in samples], dtype=np.float64)
    if x.size == 0:
        return {k: (0 if k == "n" else None) for k in LATENCY_KEYS}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {
        "n": int(x.size),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def median_spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median of ``values`` with its spread (min, max, and half the interquartile range)."""
    x = np.asarray([float(v) for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return {"median": None, "min": None, "max": None, "iqr_half": None, "n": 0}
    q1, q3 = np.percentile(x, [25, 75])
    return {
        "median": float(np.median(x)),
        "min": float(x.min()),
        "max": float(x.max()),
        "iqr_half": float((q3 - q1) / 2),
        "n": int(x.size),
    }


def write_json_atomic(path: Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, default=_json_default)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems that make ``report`` incomplete or malformed (empty list: well-formed)."""
    problems = []
    for key in (
        "benchmark",
        "schema",
        "date",
        "machine",
        "versions",
        "parameters",
        "images",
        "backends",
        "skipped",
        "results",
        "load_average",
    ):
        if key not in report:
            problems.append(f"missing key {key!r}")
    machine = report.get("machine", {})
    for key in ("cpu_model", "cpu_count", "gpus", "load_average"):
        if key not in machine:
            problems.append(f"machine lacks {key!r}")
    for key in ("embedseg_deploy", "numpy", "python"):
        if key not in report.get("versions", {}):
            problems.append(f"versions lack {key!r}")
    for key in ("threads", "tile", "batch_size", "repeats", "warmup"):
        if key not in report.get("parameters", {}):
            problems.append(f"parameters lack {key!r}")
    for b in report.get("backends", []):
        for key in ("backend", "precision", "device", "build_seconds", "tile", "batch_size"):
            if key not in b:
                problems.append(f"backend entry lacks {key!r}: {b.get('backend')}")
    for s in report.get("skipped", []):
        if not s.get("reason"):
            problems.append(f"skipped backend {s.get('backend')} has no reason")
    if not report.get("results"):
        problems.append("no results")
    for r in report.get("results", []):
        name = f"{r.get('backend')} / {r.get('image')}"
        for group in ("latency_s", "per_tile_s"):
            stats = r.get(group) or {}
            for key in LATENCY_KEYS:
                value = stats.get(key)
                if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                    problems.append(f"{name}: {group}.{key} = {value!r}")
            if (
                stats.get("n", 0)
                and not stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
            ):
                problems.append(f"{name}: {group} percentiles out of order")
        stages = r.get("stages_s") or {}
        for s in STAGES:
            if s not in stages:
                problems.append(f"{name}: stage {s!r} missing")
            elif stages[s] is not None and (not math.isfinite(stages[s]) or stages[s] < 0):
                problems.append(f"{name}: stage {s} = {stages[s]!r}")
        for key in ("throughput_per_s", "network_throughput_per_s", "tiles", "computed_over_image", "unit"):
            if key not in r:
                problems.append(f"{name}: {key!r} missing")
        if isinstance(r.get("throughput_per_s"), float) and not r["throughput_per_s"] > 0:
            problems.append(f"{name}: throughput not positive")
    return problems


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def format_markdown(report: dict[str, Any], title: str = "embedseg-run bench") -> str:
    """The report as markdown: machine line, latency table, stage table, ratios, agreement, skips."""
    m, p = report["machine"], report["parameters"]
    v = report["versions"]
    lines = [
        f"# {title} ({report['date']})",
        "",
        f"Machine: {m['cpu_model']} ({m['cpu_count']} cpus), {m.get('memory_gib')} GiB, GPUs: "
        f"{', '.join(m['gpus']) or 'none'}; load average before/after: "
        f"{_fmt_load(report['load_average']['before'])} / {_fmt_load(report['load_average']['after'])}.",
        "Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v) if k != "machine") + ".",
        f"Threads {p['threads']}, tile {p['tile']}, halo {p['halo']}, batch {p['batch_size']}, "
        f"{p['repeats']} timed runs after {p['warmup']} warm-up run(s), interleaved.",
        "",
        "| backend | precision | image | build s | p50 s | p90 s | p99 s | mean s | min s | tiles | "
        "tile p50 s | throughput | network | non-network | objects |",
        "| --- | --- | --- |" + " ---: |" * 12,
    ]
    info = {b["backend"]: b for b in report["backends"]}
    for r in report["results"]:
        b = info[r["backend"]]
        lat, unit = r["latency_s"], r["unit"]
        gf = r.get("network_gflops_per_s")
        net = f"{r['network_throughput_per_s']:.2f} {unit}/s" + (f" ({gf:.0f} GFLOP/s)" if gf else "")
        lines.append(
            f"| {r['backend']} | {b['precision']} | {r['image']} | {b['build_seconds']:.2f} | "
            f"{_fmt(lat['p50'])} | {_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(lat['mean'])} | "
            f"{_fmt(lat['min'])} | {r['tiles']} ({r['computed_over_image']:.2f}x px) | "
            f"{_fmt(r['per_tile_s']['p50'])} | {r['throughput_per_s']:.2f} {unit}/s | {net} | "
            f"{r['non_network_fraction']['median']:.1%} | {r['objects']} |"
        )
    lines += ["", "Per-stage medians (seconds; `-` = not applicable):", ""]
    lines.append("| backend | image | " + " | ".join(STAGES) + " |")
    lines.append("| --- | --- |" + " ---: |" * len(STAGES))
    for r in report["results"]:
        lines.append(
            f"| {r['backend']} | {r['image']} | " + " | ".join(_fmt(r["stages_s"][s]) for s in STAGES) + " |"
        )
    if report.get("ratios"):
        lines += ["", "Speed relative to the first backend (median of per-round ratios [min, max]):", ""]
        for q in report["ratios"]:
            s = q["speedup_vs_reference"]
            lines.append(
                f"- {q['backend']} vs {q['reference']} on {q['image']}: {s['median']:.2f}x "
                f"[{s['min']:.2f}, {s['max']:.2f}]"
            )
    if report.get("agreement"):
        lines += ["", "Labels compared with the first backend:", ""]
        for a in report["agreement"]:
            lines.append(
                f"- {a['backend']} vs {a['reference']} on {a['image']}: AP@0.5 {a['ap50']:.4f}, "
                + (f"AP@0.5:0.9 {a['ap50_90']:.4f}, " if "ap50_90" in a else "")
                + f"equal pixels "
                f"{a['equal_pixels']:.4%} ({a['equal_pixels_renamed']:.4%} after renaming ids), "
                f"identical {a['identical']}"
            )
    if report.get("skipped"):
        gpu = next((s["gpu"] for s in report["skipped"] if s.get("gpu")), None)
        lines += ["", "Skipped" + (f" (GPU backends: {gpu})" if gpu else "") + ":", ""]
        grouped: dict[tuple[str, str], list[str]] = {}
        for s in report["skipped"]:
            grouped.setdefault((s["backend"], s["reason"]), []).append(Path(s["model"]).name)
        lines += [f"- {b} ({', '.join(models)}): {reason}" for (b, reason), models in grouped.items()]
    return "\n".join(lines) + "\n"


def _fmt_load(load: Sequence[float] | None) -> str:
    return "n/a" if not load else ", ".join(f"{x:.2f}" for x in load)


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Stacked bars of the median stage times per backend and image; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    results = report["results"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results) + 2), 4.5))
    names = [f"{r['backend']}\n{r['image'][:24]}" for r in results]
    bottom = np.zeros(len(results))
    for stage in STAGES:
        values = np.array([r["stages_s"][stage] or 0.0 for r in results])
        if values.any():
            ax.bar(names, values, bottom=bottom, label=stage)
            bottom += values
    ax.set_ylabel("median seconds per image")
    ax.set_title(f"embedseg-run bench, {report['machine']['cpu_model']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
