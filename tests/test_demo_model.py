"""The bundled demo model: a valid 2D contract, described by its provenance note, and it segments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedseg_deploy.demo import DEFAULT_MODEL
from embedseg_deploy.io import sha256_file
from embedseg_deploy.metrics import matching
from embedseg_deploy.predict import Predictor
from embedseg_deploy.synthetic import make_image


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    assert DEFAULT_MODEL.is_file(), f"{DEFAULT_MODEL} missing: python -m embedseg_training.make_demo_model"
    return Predictor(DEFAULT_MODEL, backend="onnx-cpu", threads=1)


def test_contract_is_a_valid_2d_one(predictor):
    c = predictor.contract
    assert c.ndim == 2 and c.in_channels == 1 and c.out_channels == 5
    assert len(c.spacing) == 2 and c.spacing[0] == c.spacing[1] > 0
    assert c.thresholds.seed_thresh == 0.9 and c.thresholds.fg_thresh == 0.5
    assert c.thresholds.min_object_size > 0
    assert c.normalization.kind == "percentile"
    assert c.provenance["source"] == "embedseg_training"
    assert c.provenance["export"]["precision"] in ("fp32", "fp16")


def test_provenance_note_describes_the_shipped_file(predictor):
    note = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert note["file"]["sha256"] == sha256_file(DEFAULT_MODEL)
    assert note["precision"]["chosen"] == predictor.contract.provenance["export"]["precision"]
    ious = [row["val_iou"] for row in note["training"]["log"]]
    assert max(ious) > ious[0]


def test_segments_an_unseen_synthetic_image(predictor):
    image, truth = make_image((256, 256), 30, np.random.default_rng(12345))  # not the demo's seed
    labels = predictor.predict(image)
    assert labels.shape == truth.shape
    m = matching(truth, labels, thresh=0.5)
    assert m.accuracy >= 0.7, (m.accuracy, m.n_true, m.n_pred)
