import numpy as np
import pytest

from embedseg_deploy.contract import Normalization
from embedseg_deploy.normalize import NormalizationError, normalize


def test_percentile_matches_upstream_fixture_formula():
    rng = np.random.default_rng(0)
    img = rng.integers(50, 2000, size=(37, 41)).astype(np.uint16)
    out = normalize(img, Normalization())
    lo, hi = np.percentile(img.astype(np.float64), [1, 99.8])
    expected = ((img - lo) / (hi - lo + 1e-20)).astype(np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    assert out.max() > 1.0  # not clipped, as upstream


def test_percentile_is_per_channel():
    a = np.stack([np.arange(100.0).reshape(10, 10), 1000 + 10 * np.arange(100.0).reshape(10, 10)])
    out = normalize(a, Normalization(), channel_axis=0)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)
    whole = normalize(a, Normalization(per_channel=False), channel_axis=0)
    assert not np.allclose(whole[0], whole[1])


def test_absolute_and_mean_std():
    img = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    np.testing.assert_allclose(normalize(img, Normalization("absolute", divisor=255)), img / 255.0, rtol=1e-7)
    z = normalize(img, Normalization("mean-std"))
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-5


def test_constant_image_gives_finite_zeros():
    out = normalize(np.full((16, 16), 7, np.uint16), Normalization())
    assert np.isfinite(out).all() and not out.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(bad):
    img = np.ones((8, 8), np.float32)
    img[3, 4] = bad
    with pytest.raises(NormalizationError, match="NaN or infinite"):
        normalize(img, Normalization())
