"""Train upstream EmbedSeg 0.2.5 on a data folder for a fixed number of optimizer steps, then predict its
test images with upstream's own prediction path (issue 14: upstream vs ours, side by side).

Upstream runs in its own virtual environment (``/work/upstream-venv``, made by
``bench_cluster.setup_upstream``; ``--setup`` makes it), in a subprocess that executes ``RUNNER`` with
1 torch thread on the CPU (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ``OMP_WAIT_POLICY=PASSIVE``).
Nothing of upstream is imported here or copied into this repository. Inputs are only read: the crops,
checkpoints and upstream's prediction folder live in a work folder (``--work``, else a temporary folder
under scratch/upstream/ that is removed afterwards).

    python benchmarks/upstream_train.py DATA --out OUTDIR --steps N --seed S [--setup]
        [--venv /work/upstream-venv] [--work DIR]

``DATA/{train,val,test}/{images,masks}/*.tif``: 2D or 3D single-channel images, instance masks
(0 = background).
``OUTDIR`` receives upstream's predicted labels of ``DATA/test/images`` (same file names, uint16),
``upstream_train.json`` (what ran, below) and ``upstream_train.log`` (upstream's output). A finished
``OUTDIR`` is kept as it is (the stored JSON is returned), so a benchmark can resume.

Done as upstream's 2D example notebooks (``examples/2d/dsb-2018`` and ``bbbc010-2012``, 01-data /
02-train / 03-predict) do it, with upstream's defaults:

* 01-data: ``get_data_properties(..., mode='2d')`` (which runs ``calculate_object_size`` and
  ``calculate_max_eval_image_size``); ``data_type`` '16-bit' for uint16 images, else '8-bit';
  ``crop_size = max(round_up_8(avg_y + 5 std_y), round_up_8(avg_x + 5 std_x))`` (``n_sigma = 5``);
  ``generate_crops.process`` on every train and val image with center 'medoid', norm
  'min-max-percentile', ``one_hot=False``.
* 02-train: ``create_dataset_dict`` (center 'medoid'; train ``size`` below; val ``size`` = number of val
  crops, val batch 16), ``create_model_dict(input_channels=1)``, ``create_loss_dict()``
  (foreground weight 10, upstream's value for 2D), ``create_configs(n_y, n_x)`` with the grid of the data
  properties (the largest test image side rounded up to 8, square) and upstream's default pixel size
  ``l_y = l_x = 1`` (spacing ``1 / (n - 1)``), lr 5e-4, then ``begin_training``. Upstream's Adam
  (weight decay 1e-4) and its per-epoch schedule ``lr * (1 - epoch / 200) ** 0.9`` (200 hard-coded) are
  left as they are. The batch is 8 (the notebooks use 16) to match our side.
* Step budget: an epoch is ``train_size // 8`` optimizer steps (upstream's loader drops the last partial
  batch, and each sample is drawn at random from the crops, with replacement, so ``train_size`` only sets
  the epoch's length). ``train_size`` = the number of train crops (the notebooks' value) rounded up to a
  whole batch, i.e. ``iterations = ceil(crops / 8)`` as our side's ``ceil(objects / 8)``, and
  ``n_epochs = ceil(steps / iterations)``: ``epochs * iterations`` steps, ``steps`` or at most
  ``iterations - 1`` more (recorded). Should that need more than 200 epochs (upstream's schedule turns
  negative after epoch 200), ``iterations`` is raised to ``ceil(steps / 200)``.
* 03-predict: ``create_test_configs_dict`` (norm 'min-max-percentile', the same grid and pixel sizes,
  ``min_object_size = int(min_object_size)`` of the data properties, ``tta=False``, ``seed_thresh=0.90``,
  ``fg_thresh=0.5``, ``cluster_fast=True``, ``expand_grid=True``, i.e. the notebooks' values with TTA off)
  and ``begin_evaluating`` on upstream's ``best_iou_model.pth`` (best mean val crop IoU); upstream's
  ``save_dir/predictions/*.tif`` are the labels copied to OUTDIR.

3D volumes go the way of upstream's 3D notebooks (``examples/3d``, e.g. Mouse-Organoid-Cells-CBG):
``get_data_properties(mode='3d', anisotropy_factor=A)`` with ``A`` = z over x voxel size from the TIFF
metadata (``--anisotropy`` overrides); the crop's y and x as in 2D and its z ``round_up_8(avg_z + 5
std_z)`` separately; ``process_3d`` with ``speed_up`` 1 (the exact medoid; the notebooks subsample large
cells by 2-3 to bound its O(n^2) cost, which small nuclei do not need; ``--speed-up``);
``create_model_dict(num_classes=[6, 1], name='3d')``, ``create_loss_dict(n_sigma=3,
foreground_weight=<the data's background/foreground voxel ratio>)``, ``create_configs`` and
``create_test_configs_dict`` with ``name='3d'``, ``n_z`` of the data properties and ``anisotropy_factor``
(upstream's z grid: ``pixel_z = (n_z - 1) / (n_x - 1) * A``). Batch 8 as in 2D (the 3D notebooks use
1-4 on a GPU), val batch 16.

Seeding: upstream has no seed option; the runner seeds ``random``, ``numpy`` and ``torch`` with the seed
before the crops and the training. Data loading runs in the training process (``workers=0``, upstream's
default is 8 loader processes), which keeps a run on one core; the samples and augmentations are drawn
the same way.

Fixes to upstream (at run time, in ``RUNNER``; nothing in the venv is edited beyond what
``setup_upstream`` does): ``decode_instance`` of both datasets (2D, 3D) calls ``np.array(pic,
copy=False, dtype=np.uint16)``, which numpy 2 refuses for masks that are not uint16 already, so masks are
handed to it as uint16. With ``device='cpu'`` and TTA off, upstream's 2D and 3D training and prediction
paths need nothing else (its ``.cuda()`` calls are in TTA only; the checkpoint loads under torch's
``weights_only`` default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, UPSTREAM_VENV

UPSTREAM = "0.2.5"  # the embedseg version bench_cluster.setup_upstream installs
BATCH = 8
LR = 5e-4
RESULT = "upstream_train.json"
LOG = "upstream_train.log"

RUNNER = r"""
import glob, json, math, os, random, shutil, sys, time
import numpy as np, torch

cfg = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(1)
seed = cfg["seed"]
random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)

from EmbedSeg.datasets.ThreeDimensionalDataset import ThreeDimensionalDataset
from EmbedSeg.datasets.TwoDimensionalDataset import TwoDimensionalDataset
from EmbedSeg.test import begin_evaluating
from EmbedSeg.train import begin_training
from EmbedSeg.utils.create_dicts import (
    create_configs, create_dataset_dict, create_loss_dict, create_model_dict, create_test_configs_dict)
from EmbedSeg.utils.generate_crops import process, process_3d
from EmbedSeg.utils.preprocess_data import get_data_properties, round_up_8

# numpy 2: np.array(pic, copy=False, dtype=np.uint16) raises unless pic is uint16 already
for _cls in (TwoDimensionalDataset, ThreeDimensionalDataset):
    _cls.decode_instance = classmethod(
        lambda cls, pic, one_hot, bg_id=None, _decode=_cls.decode_instance.__func__:
        _decode(cls, np.asarray(pic, dtype=np.uint16), one_hot, bg_id))

data, work = cfg["data"], cfg["work"]
name, parent = os.path.basename(data), os.path.dirname(data)
center, norm, batch = "medoid", "min-max-percentile", cfg["batch"]
times = {}

# 01-data
import tifffile
first = sorted(glob.glob(os.path.join(data, "train", "images", "*.tif")))[0]
first = tifffile.imread(first)
three_d = first.ndim == 3
mode = "3d" if three_d else "2d"
aniso = cfg["anisotropy"] if three_d else None
t0 = time.perf_counter()
extra = {"anisotropy_factor": aniso} if three_d else {}
props = get_data_properties(parent, name, train_val_name=["train", "val"], test_name=["test"], mode=mode,
                            one_hot=False, process_k=None, **extra)
props["data_type"] = "16-bit" if first.dtype == np.uint16 else "8-bit"
n_sigma = 5
crop_size = int(np.maximum(
    round_up_8(props["avg_object_size_y"] + n_sigma * props["stdev_object_size_y"]),
    round_up_8(props["avg_object_size_x"] + n_sigma * props["stdev_object_size_x"])))
crop_z = None
if three_d:  # z separately, y and x square (the 3D notebooks)
    crop_z = int(round_up_8(props["avg_object_size_z"] + n_sigma * props["stdev_object_size_z"]))
n_y, n_x = int(props["n_y"]), int(props["n_x"])
n_z = int(props["n_z"]) if three_d else None
if crop_size > min(n_y, n_x) or (three_d and crop_z > n_z):
    crop_text = f"{crop_z}x{crop_size}x{crop_size}" if three_d else crop_size
    grid_text = f"{n_z}x{n_y}x{n_x}" if three_d else f"{n_y}x{n_x}"
    sys.exit(f"crop {crop_text} exceeds upstream's grid {grid_text} (the largest test image)")
crops_dir = os.path.join(work, "crops")
for subset in ("train", "val"):
    images = sorted(glob.glob(os.path.join(data, subset, "images", "*.tif")))
    masks = sorted(glob.glob(os.path.join(data, subset, "masks", "*.tif")))
    for im, inst in zip(images, masks, strict=True):
        if three_d:
            process_3d(im, inst, os.path.join(crops_dir, name), subset, crop_size, crop_size, crop_z, center,
                       norm=norm, one_hot=False, anisotropy_factor=aniso, speed_up=cfg["speed_up"],
                       data_type=props["data_type"])
        else:
            process(im, inst, os.path.join(crops_dir, name), subset, crop_size, center, one_hot=False,
                    norm=norm, data_type=props["data_type"])
times["crops"] = time.perf_counter() - t0

# 02-train
train_crops = len(os.listdir(os.path.join(crops_dir, name, "train", "images")))
val_crops = len(os.listdir(os.path.join(crops_dir, name, "val", "images")))
if not val_crops:
    sys.exit(f"no val crops of size {crop_size}")
steps = cfg["steps"]
# whole batches over the crops (as ours: ceil(objects / batch)); at most 200 epochs (upstream's schedule)
iterations = max(1, math.ceil(train_crops / batch), math.ceil(steps / 200))
train_size = batch * iterations
epochs = math.ceil(steps / iterations)
train_dataset_dict = create_dataset_dict(data_dir=crops_dir, project_name=name, center=center,
                                         size=train_size, batch_size=batch, one_hot=False, type="train",
                                         name=mode, workers=0)
val_dataset_dict = create_dataset_dict(data_dir=crops_dir, project_name=name, center=center, size=val_crops,
                                       batch_size=16, one_hot=False, type="val", name=mode, workers=0)
if three_d:  # the 3D notebooks: 7 output channels, 3 sigmas, the data's background/foreground ratio
    model_dict = create_model_dict(input_channels=1, num_classes=[6, 1], name="3d")
    loss_dict = create_loss_dict(n_sigma=3, foreground_weight=props["foreground_weight"])
    grid = dict(n_z=n_z, n_y=n_y, n_x=n_x, anisotropy_factor=aniso, l_y=1, l_x=1)
else:
    model_dict = create_model_dict(input_channels=1)
    loss_dict = create_loss_dict()
    grid = dict(n_y=n_y, n_x=n_x)
save_dir = os.path.join(work, "experiment")
configs = create_configs(n_epochs=epochs, one_hot=False, resume_path=None, save_dir=save_dir,
                         train_lr=cfg["lr"], device="cpu", **grid)
t0 = time.perf_counter()
begin_training(train_dataset_dict, val_dataset_dict, model_dict, loss_dict, configs, color_map="magma")
times["train"] = time.perf_counter() - t0

best = os.path.join(save_dir, "best_iou_model.pth")
last = torch.load(os.path.join(save_dir, "checkpoint.pth"), map_location="cpu")
log = last["logger_data"]
best_epoch = torch.load(best, map_location="cpu")["epoch"] + 1 if os.path.isfile(best) else None
checkpoint = best if best_epoch else os.path.join(save_dir, "checkpoint.pth")  # no epoch had val IoU > 0

# 03-predict
predict = dict(tta=False, ap_val=0.5, seed_thresh=0.90, fg_thresh=0.5,
               min_object_size=int(props["min_object_size"]), cluster_fast=True, expand_grid=True)
test_configs = create_test_configs_dict(data_dir=data, checkpoint_path=checkpoint, norm=norm,
                                        data_type=props["data_type"], save_dir=os.path.join(work, "predict"),
                                        save_images=True, save_results=True, device="cpu", num_workers=0,
                                        one_hot=False, name=mode, **grid, **predict)
t0 = time.perf_counter()
scores = begin_evaluating(test_configs, verbose=False)
times["predict"] = time.perf_counter() - t0

counts = {}
for path in sorted(glob.glob(os.path.join(work, "predict", "predictions", "*.tif"))):
    labels = tifffile.imread(path)
    counts[os.path.basename(path)] = int(len(np.unique(labels[labels > 0])))
result = {
    "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
    "data_properties": {k: (v.item() if hasattr(v, "item") else v) for k, v in props.items()},
    "mode": mode, "crop_size": [crop_z, crop_size, crop_size] if three_d else crop_size,
    "crop_n_sigma": n_sigma, "center": center, "norm": norm,
    "anisotropy": aniso, "speed_up": cfg["speed_up"] if three_d else None,
    "foreground_weight": float(loss_dict["lossOpts"]["foreground_weight"]),
    "train_crops": train_crops, "val_crops": val_crops, "train_size": train_size, "val_size": val_crops,
    "val_batch_size": 16, "iterations": iterations, "epochs": epochs, "steps": epochs * iterations,
    "grid": [n_z, n_y, n_x] if three_d else [n_y, n_x],
    "pixel": [configs["pixel_z"], 1.0, 1.0] if three_d else [1.0, 1.0],
    "spacing": ([configs["pixel_z"] / (n_z - 1)] if three_d else []) + [1 / (n_y - 1), 1 / (n_x - 1)],
    "best_epoch": best_epoch, "checkpoint": os.path.basename(checkpoint),
    "val_iou_by_epoch": [float(v) for v in log["iou"]],
    "train_loss_by_epoch": [float(v) for v in log["train"]],
    "val_loss_by_epoch": [float(v) for v in log["val"]],
    "predict": predict, "upstream_ap_dsb_05": float(scores["AP_dsb_05"]), "objects": counts,
    "seconds": {k: round(v, 1) for k, v in times.items()},
}
open(cfg["result"], "w").write(json.dumps(result))
"""


def finished(
    out: Path, data: Path, steps: int, seed: int, settings: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The stored result when ``out`` holds a finished run of the same data, steps, seed and ``settings``
    (keys of the runner's result, e.g. 3D's anisotropy; its JSON and every test label file)."""
    result = out / RESULT
    if not result.is_file():
        return None
    doc = json.loads(result.read_text())
    same = (doc.get("data"), doc.get("steps_requested"), doc.get("seed")) == (str(data), steps, seed)
    same = same and all(doc.get(k) == v for k, v in (settings or {}).items())
    names = [p.name for p in sorted((data / "test" / "images").glob("*.tif"))]
    return doc if same and doc.get("finished") and all((out / n).is_file() for n in names) else None


def setup(venv: Path) -> None:
    """Create the upstream venv (``bench_cluster.setup_upstream``) unless it exists."""
    if not (venv / "bin" / "python").exists():
        import bench_cluster

        bench_cluster.setup_upstream(venv)


def anisotropy_of(data: Path) -> float:
    """z voxel size over x voxel size of the first train image's TIFF metadata (1 where it has none):
    the number a user types into upstream's 3D notebooks."""
    from embedseg_deploy.io import read_tiff

    first = sorted((data / "train" / "images").glob("*.tif"))[0]
    size = read_tiff(first).pixel_size
    return float(size[0] / size[-1]) if size and len(size) == 3 else 1.0


def train_and_predict(
    data: Path,
    out: Path,
    steps: int,
    seed: int,
    venv: Path = UPSTREAM_VENV,
    work: Path | None = None,
    anisotropy: float | None = None,
    speed_up: int = 1,
) -> dict[str, Any]:
    """Train upstream on ``data`` for ``steps`` optimizer steps with ``seed``, predict ``data/test`` and
    write the labels and ``upstream_train.json`` into ``out``; returns the JSON (the stored one when
    ``out`` is finished already). ``work`` keeps crops and checkpoints (default: a temporary folder).
    3D only: ``anisotropy`` (default: from the TIFF metadata) and the medoid's ``speed_up``."""
    import tifffile

    data, out = Path(data).resolve(), Path(out).resolve()
    first = sorted((data / "train" / "images").glob("*.tif"))[:1]
    three_d = bool(first) and tifffile.imread(first[0]).ndim == 3
    anisotropy = anisotropy_of(data) if anisotropy is None and three_d else anisotropy
    settings = {"anisotropy": anisotropy, "speed_up": speed_up} if three_d else {}
    done = finished(out, data, steps, seed, settings)
    if done is not None:
        return done
    (out / RESULT).unlink(missing_ok=True)  # another run's result: this one replaces it
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"{python}: no upstream venv (python benchmarks/upstream_train.py --setup)")
    names = [p.name for p in sorted((data / "test" / "images").glob("*.tif"))]
    if not names:
        raise FileNotFoundError(f"{data / 'test' / 'images'}: no .tif images")
    scratch = REPO / "scratch" / "upstream"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{data.name}-s{seed}-", dir=scratch) as tmp:
        folder = Path(work).resolve() if work is not None else Path(tmp)
        for sub in ("crops", "experiment", "predict"):  # a reused work folder starts clean
            shutil.rmtree(folder / sub, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "data": str(data),
            "work": str(folder),
            "steps": steps,
            "seed": seed,
            "batch": BATCH,
            "lr": LR,
            "anisotropy": anisotropy if anisotropy is not None else 1.0,
            "speed_up": speed_up,
            "result": str(folder / "runner.json"),
        }
        (folder / "runner_config.json").write_text(json.dumps(cfg))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "NUMBA_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "MPLBACKEND": "Agg",
            "TQDM_DISABLE": "1",
        }
        out.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with open(out / LOG, "w") as log:
            done_run = subprocess.run(
                [str(python), "-c", RUNNER, str(folder / "runner_config.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env=env,
            )
        seconds = time.perf_counter() - t0
        if done_run.returncode:
            tail = (out / LOG).read_text()[-3000:]
            raise RuntimeError(f"upstream run failed (exit {done_run.returncode}), see {out / LOG}:\n{tail}")
        run = json.loads((folder / "runner.json").read_text())
        predictions = folder / "predict" / "predictions"
        for n in names:
            shutil.copyfile(predictions / n, out / n)
    doc = {
        "upstream": f"EmbedSeg {UPSTREAM}",
        "data": str(data),
        "seed": seed,
        "seeding": "random, numpy and torch seeded in the runner before crops and training "
        "(upstream has no seed option)",
        "steps_requested": steps,
        "batch_size": BATCH,
        "lr": LR,
        "lr_schedule": "upstream's lr * (1 - epoch / 200) ** 0.9, per epoch",
        "device": "cpu",
        "workers": 0,
        **run,
        "seconds": {**run["seconds"], "total": round(seconds, 1)},
        "load_at_start": round(load, 2),
        "finished": True,
    }
    tmp_json = out / (RESULT + ".tmp")
    tmp_json.write_text(json.dumps(doc, indent=1) + "\n")
    tmp_json.replace(out / RESULT)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder with {train,val,test}/{images,masks}/*.tif")
    parser.add_argument("--out", type=Path, required=True, help="folder for the labels and the JSON")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps (batch 8)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--setup", action="store_true", help="create the upstream venv first if missing")
    parser.add_argument("--venv", type=Path, default=UPSTREAM_VENV)
    parser.add_argument("--work", type=Path, help="keep crops and checkpoints here (default: temporary)")
    parser.add_argument("--anisotropy", type=float, help="3D: z/x voxel size (default: TIFF metadata)")
    parser.add_argument("--speed-up", type=int, default=1, help="3D: medoid subsampling in y and x")
    args = parser.parse_args()
    if args.setup:
        setup(args.venv)
    doc = train_and_predict(
        args.data, args.out, args.steps, args.seed, args.venv, args.work, args.anisotropy, args.speed_up
    )
    keys = ("crop_size", "grid", "train_crops", "train_size", "iterations", "epochs", "steps", "best_epoch")
    print(json.dumps({k: doc[k] for k in keys} | {"seconds": doc["seconds"]}))
    ap = doc["upstream_ap_dsb_05"]
    print(f"objects per test image: {doc['objects']} (upstream's own mean AP_dsb@0.5: {ap:.3f})")


if __name__ == "__main__":
    main()
