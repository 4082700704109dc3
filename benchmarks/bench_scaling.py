"""Scaling: time and peak memory against image size, 2D 512^2 to 4096^2 and 3D 32x128^2 to 64x512^2.

One fresh child process per dimensionality runs the sizes in ascending order through the product path
(:func:`embedseg_deploy.predict.process_job`: read, normalise, tiles of the contract's default CPU size,
ONNX Runtime CPU with ``allow_spinning=0`` (``--spinning``), stitch, cluster, write), after one untimed
warm-up on the smallest image; sizes below 2 M pixels are repeated (medians). The child's
``VmHWM`` after each size is that size's peak RSS (sizes ascend, so the running maximum is the
current size's peak; it is an upper bound). Images: a 1024^2 synthetic image of the fixtures' kind tiled
to each 2D size, ``bench_bigimage.make_volume`` (H7) for 3D. ``bench_bigimage.measure`` (a fresh process
per point, H7's) adds block mode for the largest 3D volume (``--blocks all|none``).

Reported per size: compute (normalise + tiles + network + stitch + cluster) and end-to-end time, network
time, the pixels the tile plan makes the network compute (tiles overlap by their halos), time per
M(px/vox), and the log-log slope of time against pixels (1.0 = linear). Targets: time linear in pixels;
3D 64x512x512 at <= 2 GB peak RSS.

    python benchmarks/bench_scaling.py [--quick] [--blocks largest|all|none] [--out benchmarks/results]

Results: ``scaling.json`` and ``scaling.md``.
"""

from __future__ import annotations

import _common

_ENV = _common.pin_threads()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import bench_bigimage  # noqa: E402
import numpy as np  # noqa: E402

from embedseg_deploy.bench import make_bench_image, median_spread, tile_plan_pixels  # noqa: E402
from embedseg_deploy.contract import Contract  # noqa: E402
from embedseg_deploy.io import write_tiff_atomic  # noqa: E402

NAME = "scaling"
SIZES = {
    2: [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096)],
    3: [(32, 128, 128), (32, 256, 256), (64, 256, 256), (64, 512, 512)],
}
QUICK_SIZES = {2: [(128, 128), (256, 256)], 3: [(16, 64, 64), (16, 128, 128)]}
REPEAT_BELOW = 2e6  # sizes with fewer pixels are measured ``--repeats`` times, larger ones once
RSS_TARGET_MIB = 2e9 / 2**20  # 2 GB (decimal) in MiB: 1907


def child(model: Path, threads: int, repeats: int, spinning: str, images: list[Path]) -> None:
    """Child process: warm up on the first image, then time every image; one JSON line per image."""
    import time

    from embedseg_deploy.backends import create_backend
    from embedseg_deploy.predict import Job, Predictor, process_job

    config = {"session.intra_op.allow_spinning": spinning}
    backend = create_backend(model, "onnx-cpu", threads=threads, session_config=config)
    predictor = Predictor(backend, threads=threads)
    out_dir = images[0].parent

    def once(src: Path) -> dict[str, float]:
        record = process_job(
            predictor, Job(src, out_dir / f"{src.stem}-labels.tif"), False, True, None, None, None
        )
        if record["status"] != "ok":
            raise RuntimeError(record.get("error"))
        return {**record["timings"], "objects": record["objects"]}

    t0 = time.perf_counter()
    once(images[0])
    print(json.dumps({"warmup_s": time.perf_counter() - t0}), flush=True)
    for src in images:
        n = repeats if np.prod(predictor_shape(src)) < REPEAT_BELOW else 1
        runs = [once(src) for _ in range(n)]
        peak = _common.peak_rss_mib()
        print(json.dumps({"image": src.name, "runs": runs, "peak_rss_mib": peak}), flush=True)


def predictor_shape(path: Path) -> tuple[int, ...]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tuple(tif.series[0].shape)


def run_child(
    model: Path, threads: int, repeats: int, spinning: str, images: list[Path]
) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--threads", str(threads)]
    cmd += ["--repeats", str(repeats), "--spinning", spinning, *map(str, images)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:
        rec = json.loads(line)
        out.append(rec)
        if "image" in rec:
            _common.log(
                f"  {rec['image']}: total {rec['runs'][-1]['total']:.2f} s, "
                f"peak RSS {rec['peak_rss_mib']:.0f} MiB"
            )
    if proc.wait():
        raise RuntimeError(f"scaling child failed:\n{proc.stderr.read()[-3000:]}")
    return out


def make_image_2d(shape: tuple[int, int], path: Path, base: np.ndarray) -> None:
    reps = [-(-s // b) for s, b in zip(shape, base.shape, strict=True)]
    image = np.tile(base, reps)[tuple(slice(0, s) for s in shape)]
    write_tiff_atomic(path, np.ascontiguousarray(image), overwrite=True)


def contract_of(model: Path) -> Contract:
    from embedseg_deploy.engine_cache import onnx_contract

    return onnx_contract(model)


def even_tile(shape: Sequence[int], tile: Sequence[int], halo: Sequence[int], multiple: int) -> list[int]:
    """Per axis, the smallest tile (a multiple of ``multiple``) covering the padded axis with as many tiles
    as ``tile`` needs: the overlap spread evenly instead of a last tile shifted inwards (a what-if)."""
    out = []
    for n, t, h in zip(shape, tile, halo, strict=True):
        padded = -(-n // multiple) * multiple
        if padded <= t:
            out.append(padded)
            continue
        count = 1 + -(-(padded - t) // (t - 2 * h))
        out.append(-(-(-(-(padded - 2 * h) // count) + 2 * h) // multiple) * multiple)
    return out


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(time) against log(pixels)."""
    if len(points) < 2:
        return None
    x, y = np.log([p for p, _ in points]), np.log([t for _, t in points])
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help=f"runs per size below {REPEAT_BELOW:.0e} px")
    parser.add_argument(
        "--blocks",
        choices=["largest", "all", "none"],
        default="largest",
        help="block-mode points (bench_bigimage.measure) for the 3D volumes",
    )
    parser.add_argument("--block", default="default", help="block core z x y x x [the runtime default]")
    parser.add_argument("--threads", type=int, default=_common.THREADS)
    parser.add_argument(
        "--spinning",
        choices=["0", "1"],
        default="0",
        help="ORT session.intra_op.allow_spinning (see hwlimit.md)",
    )
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("images", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.threads, args.repeats, args.spinning, args.images)
        return
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.quick:
        args.repeats = 1
    doc = _common.header(
        NAME,
        args.threads,
        sizes={str(k): v for k, v in sizes.items()},
        repeats=args.repeats,
        repeat_below_pixels=REPEAT_BELOW,
        backend=f"onnx-cpu, ORT allow_spinning={args.spinning}",
        tiles="contract default (cpu)",
        timing="one child process per ndim, warm-up on the smallest image",
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        tmp = Path(tmp)
        base, _ = make_bench_image((1024, 1024), seed=3)
        for ndim in (2, 3):
            model = _common.exported_model(ndim, "fp32")
            contract = contract_of(model)
            tile, halo = contract.recommended_tile("cpu")
            paths = []
            for shape in sizes[ndim]:
                src = tmp / f"image-{'x'.join(map(str, shape))}.tif"
                if ndim == 2:
                    make_image_2d(shape, src, base)
                else:
                    bench_bigimage.make_volume(shape, src)
                paths.append(src)
            _common.log(f"{ndim}D: {', '.join(p.name for p in paths)}")
            records = run_child(model, args.threads, args.repeats, args.spinning, paths)
            records = [r for r in records if "image" in r]
            for shape, rec in zip(sizes[ndim], records, strict=True):
                n_tiles, computed = tile_plan_pixels(
                    shape, tile, halo, contract.tile_multiple, contract.padding
                )
                row = summarize(
                    ndim, shape, "whole", rec["runs"], rec["peak_rss_mib"], n_tiles, computed, tile, halo
                )
                even = even_tile(shape, tile, halo, contract.tile_multiple)
                _, even_px = tile_plan_pixels(shape, even, halo, contract.tile_multiple, contract.padding)
                row["even_split"] = {"tile": even, "computed_over_image": even_px / math.prod(shape)}
                rows.append(row)
            if (
                ndim == 3 and args.blocks != "none"
            ):  # block mode: the largest volume, or all with --blocks all
                pairs = list(zip(sizes[ndim], paths, strict=True))
                for shape, src in pairs if args.blocks == "all" else pairs[-1:]:
                    r = bench_bigimage.measure(model, src, "blocks", args.threads, args.block)
                    rows.append(
                        summarize(ndim, shape, "blocks", [r], r["peak_rss_mib"], None, None, tile, halo)
                    )
                    _common.log(
                        f"  {src.name} blocks: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB"
                    )
            for src in paths:
                src.unlink()
    doc["rows"] = rows
    doc["fits"] = fits(rows)
    doc["targets"] = targets(rows, doc["fits"])
    print(_common.finish(doc, markdown, NAME if not args.quick else NAME + "_quick", args.out))


def summarize(ndim, shape, mode, runs, peak_rss, n_tiles, computed, tile, halo) -> dict[str, Any]:
    """Medians over the runs of one size: end to end, compute, network; per-M rates; peak RSS."""
    pixels = math.prod(shape)
    if mode == "blocks":  # bench_bigimage.measure: process wall time only
        compute = [r["seconds"] for r in runs]
        total, network = compute, [float("nan")]
    else:
        compute = [sum(r.get(k, 0.0) for k in ("normalize", "predict", "cluster")) for r in runs]
        total = [r["total"] for r in runs]
        network = [r["network"] for r in runs]
    row = {
        "ndim": ndim,
        "shape": list(shape),
        "mode": mode,
        "mpixels": pixels / 1e6,
        "tile": tile,
        "halo": halo,
        "tiles": n_tiles,
        "computed_over_image": computed / pixels if computed else None,
        "total_s": median_spread(total),
        "compute_s": median_spread(compute),
        "network_s": median_spread(network),
        "peak_rss_mib": peak_rss,
        "objects": runs[-1].get("objects"),
        "runs": runs,
    }
    row["compute_s_per_m"] = row["compute_s"]["median"] / (pixels / 1e6)
    if mode == "whole":
        row["network_s_per_computed_m"] = row["network_s"]["median"] / (computed / 1e6)
        row["non_network_s_per_m"] = (row["compute_s"]["median"] - row["network_s"]["median"]) / (
            pixels / 1e6
        )
    return row


def fits(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Log-log slopes of time against pixels, per dimensionality, for compute time, network time per
    computed pixel and the non-network part."""
    out = {}
    for ndim in (2, 3):
        whole = [r for r in rows if r["ndim"] == ndim and r["mode"] == "whole"]
        out[f"{ndim}d"] = {
            "compute_vs_pixels": slope([(r["mpixels"], r["compute_s"]["median"]) for r in whole]),
            "compute_vs_computed_pixels": slope(
                [(r["mpixels"] * r["computed_over_image"], r["compute_s"]["median"]) for r in whole]
            ),
            "network_vs_computed_pixels": slope(
                [(r["mpixels"] * r["computed_over_image"], r["network_s"]["median"]) for r in whole]
            ),
            "non_network_vs_pixels": slope(
                [
                    (r["mpixels"], max(r["compute_s"]["median"] - r["network_s"]["median"], 1e-6))
                    for r in whole
                ]
            ),
            "compute_s_per_m_range": [
                min(r["compute_s_per_m"] for r in whole),
                max(r["compute_s_per_m"] for r in whole),
            ],
        }
    return out


def targets(rows: list[dict[str, Any]], fit: dict[str, Any]) -> dict[str, Any]:
    biggest = max((r for r in rows if r["ndim"] == 3), key=lambda r: (r["mpixels"], r["mode"] == "whole"))
    big = [r for r in rows if r["ndim"] == 3 and r["shape"] == biggest["shape"]]
    rss = {r["mode"]: r["peak_rss_mib"] for r in big}
    return {
        "linear": {
            "slopes": {k: v["compute_vs_pixels"] for k, v in fit.items()},
            "met": all(
                v["compute_vs_pixels"] is not None and v["compute_vs_pixels"] <= 1.1 for v in fit.values()
            ),
            "criterion": "log-log slope of compute time against pixels <= 1.1",
        },
        "rss_3d_largest": {
            "shape": biggest["shape"],
            "peak_rss_mib": rss,
            "target_mib": RSS_TARGET_MIB,
            "met_by_mode": {m: v <= RSS_TARGET_MIB for m, v in rss.items()},
            "met": rss.get("whole", math.inf) <= RSS_TARGET_MIB,
            "criterion": "default mode (whole image, contract tiles); block mode reported beside it",
        },
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Scaling: time and peak memory against image size (ONNX Runtime CPU, contract default tiles)",
        "",
        _common.machine_line(doc),
        "Mode whole: one child process per ndim runs the sizes in ascending order (after a warm-up on the "
        "smallest) through read, predict, cluster, write; peak RSS = its VmHWM after that size (an upper "
        "bound). Mode blocks: benchmarks/bench_bigimage.py `measure`, a fresh process per point (time = "
        "process wall time incl. start-up). Compute = normalise + tiles + network + stitch + cluster; "
        f"medians of {doc['parameters']['repeats']} runs below {REPEAT_BELOW / 1e6:.0f} M pixels, "
        "1 run above.",
        "",
        "| image | mode | M px/vox | tiles (computed/image px) | end-to-end s | compute s | network s | "
        "compute s per M | network s per computed M | non-network s per M | peak RSS MiB | objects |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        tiles = f"{r['tiles']} ({r['computed_over_image']:.2f}x)" if r["tiles"] else "-"
        if r.get("even_split") and r["tiles"] > 1:
            e = r["even_split"]
            tiles += f"; even split {'x'.join(map(str, e['tile']))}: {e['computed_over_image']:.2f}x"
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['mode']} | {r['mpixels']:.2f} | {tiles} | "
            f"{r['total_s']['median']:.2f} | {r['compute_s']['median']:.2f} | "
            f"{_f(r['network_s']['median'])} | "
            f"{r['compute_s_per_m']:.2f} | {_f(r.get('network_s_per_computed_m'))} | "
            f"{_f(r.get('non_network_s_per_m'))} | "
            f"{r['peak_rss_mib']:.0f} | {r['objects']} |"
        )
    lines += [
        "",
        "Log-log slopes (1.0 = linear). Computed pixels = what the tile plan makes the network compute "
        "(tiles overlap by their halos and the last tile of an axis is shifted inwards, so the overlap "
        "factor changes with the image size):",
        "",
    ]
    for k, f in doc["fits"].items():
        lines.append(
            f"- {k}: compute vs image pixels {_f(f['compute_vs_pixels'])}, compute vs computed (tile) pixels "
            f"{_f(f['compute_vs_computed_pixels'])}, network vs computed pixels "
            f"{_f(f['network_vs_computed_pixels'])}, non-network vs pixels {_f(f['non_network_vs_pixels'])}; "
            f"compute s per M from {f['compute_s_per_m_range'][0]:.2f} to {f['compute_s_per_m_range'][1]:.2f}"
        )
    t = doc["targets"]
    r = t["rss_3d_largest"]
    lines += [
        "",
        "Targets:",
        "",
        f"- time linear in pixels ({t['linear']['criterion']}): slopes "
        + ", ".join(f"{k} {_f(v)}" for k, v in t["linear"]["slopes"].items())
        + f" -> {'met' if t['linear']['met'] else 'MISSED'}",
        f"- 3D {'x'.join(map(str, r['shape']))} peak RSS <= 2 GB ({r['target_mib']:.0f} MiB): "
        + "; ".join(
            f"{m} {v:.0f} MiB -> "
            + ("met" if v <= r["target_mib"] else f"MISSED by {v - r['target_mib']:.0f} MiB")
            for m, v in r["peak_rss_mib"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


def _f(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


if __name__ == "__main__":
    main()
