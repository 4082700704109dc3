"""`embedseg-run evaluate` orchestration: file pairing, errors naming files, CSV/JSON output, the table."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from embedseg_deploy.evaluate import (
    CSV_COLUMNS,
    DEFAULT_THRESHOLDS,
    evaluate_paths,
    format_table,
    pair_files,
)
from embedseg_deploy.io import InputError
from embedseg_deploy.metrics import DSB_THRESHOLDS, dsb_score, matching, matching_dataset

from .conftest import run_without_torch, upstream_case


def labels_a():
    """GT: two 10x10 squares; prediction: the first shifted by 2 rows (IoU 80/120), the second exact."""
    gt = np.zeros((24, 24), np.uint16)
    gt[0:10, 0:10], gt[12:22, 12:22] = 1, 2
    pred = np.zeros_like(gt)
    pred[2:12, 0:10], pred[12:22, 12:22] = 4, 9
    return pred, gt


def labels_b():
    """3D: GT a 4x4x4 cube and a missed 1x2x2 box; prediction the cube shifted by 1 (IoU 48/80) and a
    4-voxel false positive."""
    gt = np.zeros((6, 8, 8), np.uint8)
    gt[0:4, 0:4, 0:4], gt[5:6, 6:8, 6:8] = 3, 5
    pred = np.zeros((6, 8, 8), np.uint32)
    pred[1:5, 0:4, 0:4], pred[5:6, 0:2, 6:8] = 1, 2
    return pred, gt


@pytest.fixture
def folders(tmp_path):
    """pred/ and gt/ with two pairs; the suffixes differ (.tif vs .tiff) on purpose."""
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for name, (pred, gt) in {"a": labels_a(), "b": labels_b()}.items():
        tifffile.imwrite(tmp_path / "pred" / f"{name}.tif", pred)
        tifffile.imwrite(tmp_path / "gt" / f"{name}.tiff", gt)
    return tmp_path / "pred", tmp_path / "gt"


def test_folders_pair_by_name_and_match_the_metrics(folders, tmp_path):
    pred, gt = folders
    report = evaluate_paths(pred, gt, out_dir=tmp_path / "out")
    assert [r.name for r in report.images] == ["a", "b"]
    assert report.thresholds == DEFAULT_THRESHOLDS == DSB_THRESHOLDS
    pairs = [labels_a(), labels_b()]
    for agg in ("pooled", "per_image_mean"):
        expected = matching_dataset(
            [g for _, g in pairs], [p for p, _ in pairs], DSB_THRESHOLDS, aggregation=agg
        )
        assert [m.to_dict() for m in report.summaries[agg].matchings] == [m.to_dict() for m in expected]
    # by hand at 0.5: a has 2 TP (IoU 2/3 and 1); b has 1 TP (0.6), 1 FP and 1 FN
    pooled, mean = report.pooled.matchings[0], report.per_image_mean.matchings[0]
    assert (pooled.tp, pooled.fp, pooled.fn) == (3, 1, 1)
    assert pooled.accuracy == pytest.approx(3 / 5)
    assert mean.accuracy == pytest.approx((1 + 1 / 3) / 2)
    assert report.images[1].dsb == pytest.approx(dsb_score(pairs[1][1], pairs[1][0]))
    assert report.per_image_mean.dsb == pytest.approx(np.mean([r.dsb for r in report.images]))
    assert report.pooled.seg == pytest.approx((80 / 120 + 1 + 0.6 + 0) / 4)  # CTC: over all GT objects


def test_csv_and_json_are_written_atomically(folders, tmp_path):
    pred, gt = folders
    out = tmp_path / "out"
    report = evaluate_paths(pred, gt, out_dir=out, thresholds=[0.5, 0.75])
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.csv", "evaluation.json"]  # no temp files
    with open(report.csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) == 2 * 2 + 2 * 2  # images x thresholds, then both summaries x thresholds
    first = rows[0]
    assert (first["image"], first["aggregation"], float(first["thresh"])) == ("a", "image", 0.5)
    assert first["gt_file"].endswith("a.tiff") and int(first["tp"]) == 2
    pooled_05 = next(r for r in rows if r["aggregation"] == "pooled" and float(r["thresh"]) == 0.5)
    assert float(pooled_05["accuracy"]) == pytest.approx(report.pooled.matchings[0].accuracy)
    assert int(pooled_05["n_images"]) == 2
    data = json.loads(report.json_path.read_text())
    assert data["thresholds"] == [0.5, 0.75] and data["n_images"] == 2
    assert data["summaries"]["per_image_mean"]["dsb"] == pytest.approx(report.per_image_mean.dsb)
    assert data["images"][1]["matchings"][0]["fn"] == 1
    evaluate_paths(pred, gt, out_dir=out, thresholds=[0.5])  # reruns replace the files
    assert json.loads(report.json_path.read_text())["thresholds"] == [0.5]


def test_format_table_rows_and_modes(folders):
    report = evaluate_paths(*folders, thresholds=[0.5, 0.9])
    text = format_table(report)
    assert "per-image mean" in text and "pooled" in text
    lines = text.splitlines()
    rows = [line.split() for line in lines if line.strip().startswith(("0.50", "0.90"))]
    assert len(rows) == 4
    # per-image mean at 0.5: a (P 1, R 1, acc 1, F1 1, PQ 5/6), b (1/2, 1/2, 1/3, 1/2, 0.6/2)
    assert rows[0] == ["0.50", "3", "1", "1", "0.7500", "0.7500", "0.6667", "0.7500", "0.5667"]
    assert rows[2][6] == "0.6000"  # pooled accuracy at 0.5: 3 / 5
    assert (
        "DSB score" in text
        and len({len(line) for line in lines if line[:6].strip() in ("0.50", "0.90")}) == 1
    )


def test_format_table_says_counts_are_sums_not_means(folders):
    """Per-image mean at 0.5 shows TP 3 = 2 (a) + 1 (b): a sum, as in the CSV and JSON, so say so."""
    report = evaluate_paths(*folders, thresholds=[0.5])
    lines = format_table(report).splitlines()
    titles = [line for line in lines if line.startswith(("per-image", "pooled"))]
    assert titles == [
        "per-image mean of the rates (as EmbedSeg, Cellpose and Kaggle DSB report); "
        "TP/FP/FN summed over the 2 image(s):",
        "pooled over all objects (StarDist matching_dataset default); TP/FP/FN summed over the 2 image(s):",
    ]
    row = lines[lines.index(titles[0]) + 2].split()
    mean = report.per_image_mean.matchings[0]
    assert (
        [int(v) for v in row[1:4]]
        == [mean.tp, mean.fp, mean.fn]
        == [sum(getattr(r.matchings[0], k) for r in report.images) for k in ("tp", "fp", "fn")]
    )


def test_file_pairs_and_file_in_folder(folders, tmp_path):
    pred, gt = folders
    one = evaluate_paths(pred / "b.tif", gt / "b.tiff")
    assert len(one.images) == 1 and one.images[0].shape == (6, 8, 8)
    assert pair_files(pred / "a.tif", gt)[0][0].gt == gt / "a.tiff"
    assert pair_files(pred, gt / "b.tiff")[0][0].pred == pred / "b.tif"
    tifffile.imwrite(tmp_path / "c.tif", labels_a()[0])
    with pytest.raises(InputError, match=r"no \.tif/\.tiff file named 'c'"):
        pair_files(tmp_path / "c.tif", gt)


def test_predictions_of_ome_tiffs_pair_with_their_ground_truth(folders):
    """`embedseg-run predict` names the labels of ``b.ome.tif`` ``b.tif``: they pair with ``b.ome.tif``."""
    pred, gt = folders
    (gt / "b.tiff").rename(gt / "b.ome.tif")
    report = evaluate_paths(pred, gt)
    assert [(r.name, r.gt.name) for r in report.images] == [("a", "a.tiff"), ("b", "b.ome.tif")]
    assert pair_files(pred / "b.tif", gt)[0][0].gt == gt / "b.ome.tif"


def test_missing_partners_are_listed(folders):
    pred, gt = folders
    (pred / "b.tif").rename(pred / "z.tif")
    with pytest.raises(InputError) as err:
        evaluate_paths(pred, gt)
    assert "no prediction for 1 ground-truth file(s): b.tiff" in str(err.value)
    assert "no ground truth for 1 prediction(s): z.tif" in str(err.value)
    report = evaluate_paths(pred, gt, strict=False)
    assert [r.name for r in report.images] == ["a"]
    assert [p.name for p in report.unpaired_pred] == ["z.tif"] and [p.name for p in report.unpaired_gt] == [
        "b.tiff"
    ]


def test_bad_files_are_named(folders, tmp_path):
    pred, gt = folders
    tifffile.imwrite(pred / "a.tif", labels_a()[0][:20])
    with pytest.raises(
        InputError, match=r"a\.tif has shape \(20, 24\) but its ground truth .*a\.tiff has \(24, 24\)"
    ):
        evaluate_paths(pred, gt)
    tifffile.imwrite(pred / "a.tif", labels_a()[0].astype(np.float32))
    with pytest.raises(InputError, match=r"a\.tif: label images must hold integers, got float32"):
        evaluate_paths(pred, gt)
    tifffile.imwrite(pred / "a.tiff", labels_a()[0])
    with pytest.raises(InputError, match=r"both a\.tif and a\.tiff"):
        evaluate_paths(pred, gt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.tif/\.tiff files"):
        evaluate_paths(tmp_path / "empty", gt)
    with pytest.raises(InputError, match="not found"):
        evaluate_paths(tmp_path / "nope", gt)


def test_threshold_and_criterion_options(folders):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        evaluate_paths(*folders, thresholds=[0.0, 0.5])
    report = evaluate_paths(*folders, thresholds=np.arange(0.5, 0.7, 0.05))
    assert report.thresholds == (0.5, 0.55, 0.6, 0.65)  # arange's 0.6000000000000001 is rounded
    iot = evaluate_paths(*folders, thresholds=[0.7], criterion="iot")
    pred, gt = labels_b()
    assert iot.images[1].matchings[0].tp == matching(gt, pred, 0.7, "iot").tp == 1  # iot 0.75, IoU 0.6
    assert iot.images[1].dsb == pytest.approx(dsb_score(gt, pred))  # DSB always uses IoU


def test_ignore_label_reaches_the_metrics(tmp_path):
    gt = np.zeros((10, 20), np.uint16)
    gt[:, :10], gt[:, 10:] = 2, 1  # label 1: unannotated region
    pred = np.zeros_like(gt)
    pred[:, :15] = 7
    tifffile.imwrite(tmp_path / "p.tif", pred)
    tifffile.imwrite(tmp_path / "g.tif", gt)
    plain = evaluate_paths(tmp_path / "p.tif", tmp_path / "g.tif", thresholds=[0.6])
    ignored = evaluate_paths(tmp_path / "p.tif", tmp_path / "g.tif", thresholds=[0.6], ignore_label=1)
    assert plain.images[0].matchings[0].fn == 1 and ignored.images[0].matchings[0].accuracy == 1.0
    assert "ignore_label 1" in format_table(ignored)


@pytest.mark.parametrize(("ndim", "accuracy", "n_true", "n_pred"), [(2, 0.8852, 58, 57), (3, 0.6923, 13, 9)])
def test_upstream_fixture_ap_at_half(ndim, accuracy, n_true, n_pred):
    """Upstream EmbedSeg's own AP_dsb@0.5 of its labels against the mask (fixture README)."""
    case = upstream_case(ndim)
    report = evaluate_paths(case / "upstream_labels.tif", case / "mask.tif", thresholds=[0.5])
    m = report.images[0].matchings[0]
    assert (m.n_true, m.n_pred) == (n_true, n_pred)
    assert m.accuracy == pytest.approx(accuracy, abs=5e-5)


def test_evaluate_runs_without_torch(folders, tmp_path):
    pred, gt = folders
    code = """
        import sys
        from embedseg_deploy.evaluate import evaluate_paths, format_table
        print(format_table(evaluate_paths(sys.argv[1], sys.argv[2], out_dir=sys.argv[3])))
        assert "torch" not in sys.modules
    """
    result = run_without_torch(code, str(pred), str(gt), str(tmp_path / "out"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pooled" in result.stdout and (tmp_path / "out" / "evaluation.json").exists()
