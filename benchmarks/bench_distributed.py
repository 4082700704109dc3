"""Big volumes: the network work of block mode, and dask.distributed throughput and memory per worker.

Part ``work`` (one process, 2 threads): a 64x1024x1024 volume like the 3D fixture's data, segmented
whole (the network tiled as the contract says), in block mode with the network per block (each block's
region: core plus halo) and in block mode with the network once over the whole image (then clustered
block by block). The network's input voxels are counted at the backend (every call, every tile), so the
ratio to whole-image mode is the network work each mode really did. Labels are compared across modes.

Part ``dask`` (each case in a fresh process): the same volume in block mode by one process (2 threads)
and by a 2-worker ``LocalCluster`` (1 thread each) side by side, throughput in MVoxel/s and identical
labels; then 64x2048x2048 and 256x1024x1024 uint16 volumes written as OME-Zarr, segmented on the
2-worker cluster, with the peak resident set (``VmHWM``) of every worker and of the client.

    python benchmarks/bench_distributed.py [work] [dask | dask-memory] [--budget 1.5G] [--quick] [--name N]

Uses the upstream fixture 3D checkpoint exported to ONNX. Results: benchmarks/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import RESULTS, exported_model, finish, header, log, machine_line, pin_threads

pin_threads()

import numpy as np  # noqa: E402

WORK_SHAPE = (64, 1024, 1024)
BIG_SHAPES = [(64, 2048, 2048), (256, 1024, 1024)]
MIB = 2**20

DASK_CHILD = textwrap.dedent(
    """
    import json, sys, time
    args = json.loads(sys.argv[1])
    from embedseg_deploy.predict import Predictor, predict_files

    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

    workers = args["workers"]
    predictor = Predictor(args["model"], backend="onnx-cpu", threads=2 if not workers else 1)
    executor = None
    if workers:
        from embedseg_deploy.dask_run import DaskExecutor
        executor = DaskExecutor(predictor, workers=workers, threads=1)
        executor.client.run(lambda: None)  # workers up before the clock starts
    t0 = time.perf_counter()
    summary = predict_files(predictor, [args["input"]], args["out"], memory_budget=args["budget"],
                            executor=executor, summary_name=None)
    seconds = time.perf_counter() - t0
    worker_peaks = []
    if executor is not None:
        worker_peaks = sorted(executor.client.run(hwm).values())
        executor.close()
    record = summary["files"][0]
    peaks = {"client_peak": hwm(), "worker_peaks": worker_peaks}
    print(json.dumps({"seconds": seconds, "record": record, **peaks}))
    """
)


WORK_CHILD = textwrap.dedent(
    """
    import json, math, sys, time
    args = json.loads(sys.argv[1])
    from embedseg_deploy.bigimage import predict_big
    from embedseg_deploy.io import read_tiff, write_tiff_atomic
    from embedseg_deploy.predict import Predictor

    predictor = Predictor(args["model"], backend="onnx-cpu", threads=2)
    counted = {"voxels": 0, "calls": 0}
    run = predictor.backend.run

    def counting(batch):
        counted["voxels"] += math.prod(batch.shape[2:]) * batch.shape[0]
        counted["calls"] += 1
        return run(batch)

    predictor.backend.run = counting
    t0 = time.perf_counter()
    if args["mode"] == "whole image":
        result = predictor.run(read_tiff(args["input"]).data)
        write_tiff_atomic(args["out"], result.labels.astype("uint16"))
        objects, blocks, tiles = result.n_objects, 1, counted["calls"]
    else:
        once = args["mode"].endswith("once")
        r = predict_big(predictor, args["input"], args["out"], memory_budget=args["budget"],
                        network_once=once)
        objects, blocks, tiles = r.n_objects, r.blocks, r.network_tiles
    seconds = time.perf_counter() - t0
    print(json.dumps({"network_voxels": counted["voxels"], "network_calls": counted["calls"],
                      "blocks": blocks, "network_tiles": tiles, "seconds": round(seconds, 2),
                      "objects": objects, "tile": predictor.tile, "halo": predictor.halo}))
    """
)


def make_volume(shape: tuple[int, ...], path: Path, zarr: bool = False) -> None:
    """A uint16 volume like the 3D fixture's data (32x256^2 with ~250 nuclei, tiled), as TIFF or OME-Zarr."""
    from embedseg_deploy.io import write_tiff_atomic
    from embedseg_deploy.synthetic import make_image

    base, _ = make_image((32, 256, 256), 250, np.random.default_rng(0), radius=(5.0, 9.0), anisotropy=2.0)
    reps = [-(-s // b) for s, b in zip(shape, base.shape, strict=True)]
    image = np.ascontiguousarray(np.tile(base.astype(np.uint16), reps)[tuple(slice(0, s) for s in shape)])
    if zarr:
        from embedseg_deploy.ngff import write_image

        write_image(path, image, "ZYX", (2.0, 1.0, 1.0), chunks=(16, 256, 256))
    else:
        write_tiff_atomic(path, image, overwrite=True)


def work(model: Path, tmp: Path, budget: str) -> dict:
    """Network input voxels and wall time of whole-image and the two block modes, each in a fresh process
    (block mode sizes its blocks from the budget minus what the process already holds)."""
    from embedseg_deploy.io import read_tiff

    src = tmp / "work.tif"
    make_volume(WORK_SHAPE, src)
    rows, labels = [], {}
    for mode in ("whole image", "blocks, network per block", "blocks, network once"):
        out = tmp / f"work-{len(rows)}.tif"
        args = {"model": str(model), "input": str(src), "out": str(out), "mode": mode, "budget": budget}
        proc = subprocess.run([sys.executable, "-c", WORK_CHILD, json.dumps(args)], capture_output=True,
                              text=True, check=False, cwd=tempfile.gettempdir())  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        labels[mode] = read_tiff(out).data
        rows.append({"mode": mode, **row})
        log(json.dumps(rows[-1]))
    from embedseg_deploy.metrics import matching

    whole = rows[0]["network_voxels"]
    reference = labels["whole image"]
    for row in rows:
        row["work_vs_whole"] = round(row["network_voxels"] / whole, 3)
        mine = labels[row["mode"]]
        row["same_labels_as_whole"] = same_partition(mine, reference)
        row["matched_iou_0.9"] = int(matching(reference, mine, thresh=0.9).tp)
        row["foreground_voxels_differing"] = int(((mine > 0) != (reference > 0)).sum())
        row["foreground_voxels"] = int((reference > 0).sum())
    return {"shape": list(WORK_SHAPE), "tile": rows[0]["tile"], "halo": rows[0]["halo"], "rows": rows,
            "image_voxels": math.prod(WORK_SHAPE)}  # fmt: skip


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering (0 stays background)."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0].astype(np.int64), b[a > 0].astype(np.int64)]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def run_child(model: Path, src: Path, out: Path, workers: int, budget: str) -> dict:
    args = {"model": str(model), "input": str(src), "out": str(out), "workers": workers, "budget": budget}
    proc = subprocess.run(
        [sys.executable, "-c", DASK_CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{src.name} with {workers} workers failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dask(model: Path, tmp: Path, budget: str, throughput_runs: bool = True) -> dict:
    from embedseg_deploy.io import read_tiff

    src = tmp / "work.tif"
    if throughput_runs and not src.exists():
        make_volume(WORK_SHAPE, src)
    throughput = []
    for workers in (0, 2) if throughput_runs else ():
        r = run_child(model, src, tmp / f"tp{workers}", workers, budget)
        voxels = math.prod(WORK_SHAPE)
        throughput.append(
            {
                "run": "1 process, 2 threads"
                if not workers
                else f"LocalCluster, {workers} workers x 1 thread",
                "seconds": round(r["seconds"], 2),
                "mvoxel_per_s": round(voxels / r["seconds"] / 1e6, 3),
                "mode": r["record"].get("mode"),
                "objects": r["record"].get("objects"),
                "client_peak_mib": round(r["client_peak"] / MIB),
                "worker_peaks_mib": [round(p / MIB) for p in r["worker_peaks"]],
            }
        )
        log(json.dumps(throughput[-1]))
    same = throughput_runs and np.array_equal(
        read_tiff(tmp / "tp0" / "work.tif").data, read_tiff(tmp / "tp2" / "work.tif").data
    )
    memory = []
    for shape in BIG_SHAPES:
        store = tmp / f"{'x'.join(map(str, shape))}.zarr"
        make_volume(shape, store, zarr=True)
        r = run_child(model, store, tmp / f"big-{store.stem}", 2, budget)
        memory.append(
            {
                "shape": list(shape),
                "mvoxel": round(math.prod(shape) / 1e6, 1),
                "seconds": round(r["seconds"], 1),
                "mvoxel_per_s": round(math.prod(shape) / r["seconds"] / 1e6, 3),
                "mode": r["record"].get("mode"),
                "objects": r["record"].get("objects"),
                "status": r["record"]["status"],
                "worker_peaks_mib": [round(p / MIB) for p in r["worker_peaks"]],
                "client_peak_mib": round(r["client_peak"] / MIB),
            }
        )
        log(json.dumps(memory[-1]))
        import shutil

        shutil.rmtree(store)
        shutil.rmtree(tmp / f"big-{store.stem}")
    return {"throughput": throughput, "dask_labels_equal_single_process": bool(same), "memory": memory}


def markdown(doc: dict) -> str:
    lines = [
        "# Big volumes: network work of block mode, dask throughput and memory per worker",
        "",
        machine_line(doc),
        "",
        f"Memory budget per process / worker: {doc['parameters']['budget']}.",
    ]
    if "work" in doc:
        w = doc["work"]
        lines += [
            "",
            f"## Network work, {'x'.join(map(str, w['shape']))} (tile {w['tile']}, halo {w['halo']})",
            "",
            "| mode | blocks | network input voxels | vs whole image | s | objects | labels = whole | "
            "matched at IoU 0.9 | foreground voxels differing |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for r in w["rows"]:
            lines.append(
                f"| {r['mode']} | {r['blocks']} | {r['network_voxels'] / 1e6:.1f} M "
                f"| {r['work_vs_whole']:.2f}x "
                f"| {r['seconds']} | {r['objects']} | {'yes' if r['same_labels_as_whole'] else 'no'} "
                f"| {r['matched_iou_0.9']} | {r['foreground_voxels_differing']} of {r['foreground_voxels']} |"
            )
        lines += [
            "",
            "Network input voxels are counted at the backend. Whole-image mode tiles the volume with the "
            "contract's tile; block mode with the network once uses the tiles that fit the budget, then "
            "clusters block by block; with the network per block every block's region (core + halo) goes "
            "through the network. Different tiles give slightly different network output near tile seams "
            "(the receptive field is wider than the halo), hence voxels that differ at object borders.",
        ]
    if "dask" in doc and doc["dask"]["throughput"]:
        d = doc["dask"]
        lines += [
            "",
            "## Throughput, one process vs a 2-worker LocalCluster (same volume, block mode)",
            "",
            "| run | s | MVoxel/s | objects | peak RSS client / workers MiB |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for r in d["throughput"]:
            peaks = ", ".join(map(str, r["worker_peaks_mib"])) or "-"
            lines.append(
                f"| {r['run']} | {r['seconds']} | {r['mvoxel_per_s']} | {r['objects']} | "
                f"{r['client_peak_mib']} / {peaks} |"
            )
        lines += [
            "",
            f"Labels of the cluster run equal the single process's: {d['dask_labels_equal_single_process']}.",
        ]
    if "dask" in doc:
        d = doc["dask"]
        lines += [
            "",
            "## Peak RSS per worker, OME-Zarr volumes on a 2-worker LocalCluster",
            "",
            "| volume | MVoxel | mode | s | MVoxel/s | objects | worker peaks MiB | client MiB |",
            "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |",
        ]
        for r in d["memory"]:
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {r['mvoxel']} | {r['mode']} | {r['seconds']} | "
                f"{r['mvoxel_per_s']} | {r['objects']} | {', '.join(map(str, r['worker_peaks_mib']))} | "
                f"{r['client_peak_mib']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parts", nargs="*", help="work, dask, dask-memory (default: work and dask)")
    parser.add_argument("--budget", default="1.5G", help="memory budget per process / worker")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny volumes, results to a temp folder")
    parser.add_argument("--name", default="distributed", help="result file name")
    args = parser.parse_args()
    args.parts = args.parts or ["work", "dask"]
    if set(args.parts) - {"work", "dask", "dask-memory"}:
        parser.error(
            f"parts are work, dask and dask-memory (dask without the throughput runs), not {args.parts}"
        )
    doc = header("distributed", 2, budget=args.budget, parts=args.parts)
    model = exported_model(3)
    if args.quick:  # a smoke test of the script: tiny volumes, results not kept with the others
        global WORK_SHAPE, BIG_SHAPES
        WORK_SHAPE, BIG_SHAPES = (16, 160, 150), [(16, 200, 200), (40, 100, 100)]
        args.out = Path(tempfile.mkdtemp(prefix="bench-distributed-quick-"))
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        if "work" in args.parts:
            doc["work"] = work(model, Path(tmp), args.budget)
        if "dask" in args.parts or "dask-memory" in args.parts:
            doc["dask"] = dask(model, Path(tmp), args.budget, throughput_runs="dask" in args.parts)
    print(finish(doc, markdown, args.name, args.out))


if __name__ == "__main__":
    main()
