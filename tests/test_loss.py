"""The spatial-embedding loss against a slow per-object reference written from the method notes (sec. 4)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from embedseg_training.loss import (
    SpatialEmbLoss,
    lovasz_hinge_rows,
    object_ious,
    pixel_coordinates,
    spatial_embedding_loss,
)
from embedseg_training.model import BranchedERFNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------------
# slow reference: one image, one object at a time, float64, Lovász extension evaluated from its definition


def _jaccard_loss_of_errors(mispredicted: np.ndarray, fg: np.ndarray) -> float:
    """Berman's Delta_J(M) = 1 - |y minus M| / |y union M| for the set M of mispredicted pixels."""
    inter = np.count_nonzero(fg & ~mispredicted)
    union = np.count_nonzero(fg | mispredicted)
    return 1.0 - inter / union if union else 0.0


def ref_lovasz_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász extension of Delta_J at the hinge errors, built prefix by prefix (O(N^2), tiny inputs only)."""
    signs = 2.0 * labels.double() - 1.0
    errors = 1.0 - logits.double() * signs
    order = np.argsort(-errors.detach().numpy(), kind="stable")
    fg = labels.numpy().astype(bool)
    mis = np.zeros(fg.shape, bool)
    prev = 0.0
    loss = errors.new_zeros(())
    for i in order:
        mis[i] = True
        cur = _jaccard_loss_of_errors(mis, fg)
        loss = loss + torch.relu(errors[i]) * (cur - prev)
        prev = cur
    return loss


def ref_loss(pred, instances, centers, spacing, fg_weight=10.0, w=(1.0, 10.0, 1.0)):
    ndim = pred.dim() - 2
    total = pred.new_zeros((), dtype=torch.float64)
    ious = []
    for b in range(pred.shape[0]):
        p = pred[b].double()
        shape = p.shape[1:]
        # coordinate of every pixel, embedding dim d along array axis ndim-1-d
        idx = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
        xyz = torch.stack([idx[ndim - 1 - d] * spacing[ndim - 1 - d] for d in range(ndim)])
        emb = torch.tanh(p[:ndim]) + xyz
        sigma = p[ndim : 2 * ndim]
        seed = torch.sigmoid(p[2 * ndim])
        inst = instances[b]
        l_inst = l_var = 0.0
        l_seed = (seed[inst == 0] ** 2).sum()
        ids = [int(i) for i in torch.unique(inst) if i != 0]
        for i in ids:
            m = inst == i
            cm = m & centers[b].bool()
            if int(cm.sum()) == 1:
                c = xyz[:, cm].reshape(ndim, *([1] * ndim))
            else:
                c = xyz[:, m].mean(1).reshape(ndim, *([1] * ndim))
            s_in = sigma[:, m]
            s = s_in.mean(1).reshape(ndim, *([1] * ndim))
            l_var = l_var + ((s_in - s.detach().reshape(ndim, 1)) ** 2).mean()
            phi = torch.exp(-(((emb - c) ** 2) * torch.exp(10 * s)).sum(0))
            l_inst = l_inst + ref_lovasz_hinge((2 * phi - 1).reshape(-1), m.reshape(-1))
            l_seed = l_seed + fg_weight * ((seed[m] - phi[m].detach()) ** 2).sum()
            hit = phi > 0.5
            ious.append(float((hit & m).sum()) / float((hit | m).sum()))
        if ids:
            l_inst = l_inst / len(ids)
            l_var = l_var / len(ids)
        l_seed = l_seed / inst.numel()
        total = total + w[0] * l_inst + w[1] * l_var + w[2] * l_seed
    return total / pred.shape[0], ious


# ----------------------------------------------------------------------------------------------------------
# synthetic crops


def synthetic_batch(ndim: int, shape, batch: int, seed: int = 0):
    """Random raw outputs plus instance crops of boxes, with one centre pixel per object except some:
    object 2 of image 0 gets none, object 3 of image 0 gets two (both fall back to the mean), and the last
    image has no objects at all (background-only crop)."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, 2 * ndim + 1, *shape, generator=g, dtype=torch.float32) * 0.5
    pred[:, ndim : 2 * ndim] -= 0.3  # moderate bandwidths so phi is neither 0 nor 1 everywhere
    instances = torch.zeros(batch, *shape, dtype=torch.int16)
    centers = torch.zeros(batch, *shape, dtype=torch.bool)
    rng = np.random.default_rng(seed)
    for b in range(batch - 1):
        for obj in range(1, 5):
            lo = [int(rng.integers(0, s - 4)) for s in shape]
            ext = [int(rng.integers(2, 5)) for _ in shape]
            box = tuple(slice(a, min(a + e, s)) for a, e, s in zip(lo, ext, shape, strict=True))
            instances[(b, *box)] = obj * 3 + b  # non-consecutive ids
        for i in torch.unique(instances[b]):
            if i == 0:
                continue
            pts = torch.nonzero(instances[b] == i)
            if b == 0 and i == 2 * 3:
                continue
            centers[(b, *pts[len(pts) // 2])] = True
            if b == 0 and i == 3 * 3:
                centers[(b, *pts[0])] = True
    return pred, instances, centers


@pytest.mark.parametrize(
    "ndim,shape,spacing,sigma_shift",
    [
        (2, (16, 20), [0.03, 0.05], 0.0),
        (3, (6, 8, 10), [0.03, 0.05, 0.04], 0.0),
        # upstream's 1024 grid and narrow bandwidths (exp(10 * 1.2) ~ 1.6e5): the expanded squared distance
        # must stay accurate where phi crosses 0.5
        (2, (40, 48), [1 / 1023, 1 / 1023], 1.5),
    ],
)
def test_matches_slow_reference_values_and_gradients(ndim, shape, spacing, sigma_shift):
    pred, inst, cen = synthetic_batch(ndim, shape, batch=3, seed=ndim)
    pred[:, ndim : 2 * ndim] += sigma_shift
    pred[:, :ndim] *= 0.01 if sigma_shift else 1.0  # offsets of a few pixels at most on the fine grid
    p1 = pred.clone().requires_grad_(True)
    res = spatial_embedding_loss(
        p1, inst, cen, spacing, foreground_weight=7.0, compute_iou=True, chunk_elements=400
    )
    res.loss.backward()
    p2 = pred.clone().double().requires_grad_(True)
    ref, ref_ious = ref_loss(p2, inst, cen, spacing, fg_weight=7.0)
    ref.backward()
    assert res.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(p1.grad.numpy(), p2.grad.numpy(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(res.ious.numpy(), ref_ious, atol=1e-6)
    assert len(ref_ious) > 4  # objects of more than one image took part
    # the parts recombine into the total with the weights 1, 10, 1
    assert (res.inst + 10 * res.var + res.seed).item() == pytest.approx(res.loss.item(), rel=1e-5)


def test_chunking_does_not_change_the_result():
    pred, inst, cen = synthetic_batch(2, (16, 16), batch=2, seed=5)
    a = spatial_embedding_loss(pred, inst, cen, [0.02, 0.02], chunk_elements=1)
    b = spatial_embedding_loss(pred, inst, cen, [0.02, 0.02], chunk_elements=1 << 20)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)


def test_lovasz_rows_against_definition_and_known_values():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, generator=g)
    labels = torch.rand(4, 30, generator=g) > 0.6
    rows = lovasz_hinge_rows(logits, labels)
    for r in range(4):
        assert rows[r].item() == pytest.approx(ref_lovasz_hinge(logits[r], labels[r]).item(), rel=1e-5)
    # logits 0: every hinge error is 1; the Lovász extension of Delta_J at the all-ones vector is Delta_J(all)
    # = 1
    assert lovasz_hinge_rows(torch.zeros(1, 9), labels[:1, :9]).item() == pytest.approx(1.0)
    # margins >= 1 on the right side: zero loss
    perfect = 2.0 * (2.0 * labels.float() - 1.0)
    assert torch.all(lovasz_hinge_rows(perfect, labels) == 0)


def test_perfect_prediction_gives_iou_one_and_small_seed_loss():
    # offsets pull every object pixel exactly onto its centre; seed logit high inside, low outside
    shape, spacing = (16, 16), [0.01, 0.01]
    inst = torch.zeros(1, *shape, dtype=torch.int32)
    inst[0, 2:6, 3:8] = 1
    inst[0, 9:14, 8:12] = 2
    cen = torch.zeros(1, *shape, dtype=torch.bool)
    cen[0, 4, 5] = cen[0, 11, 10] = True
    xy = pixel_coordinates(shape, spacing).reshape(2, *shape)
    pred = torch.zeros(1, 5, *shape)
    target = xy.clone()
    for i, (y, x) in ((1, (4, 5)), (2, (11, 10))):
        target[:, inst[0] == i] = torch.tensor([x * 0.01, y * 0.01])[:, None]
    pred[0, :2] = torch.atanh(target - xy)
    pred[0, 2:4] = 1.0  # bandwidth e^10: phi > 0.5 only within ~0.6 px of the centre
    pred[0, 4] = torch.where(inst[0] > 0, 8.0, -8.0)
    ious = object_ious(pred, inst, cen, spacing)
    assert ious.tolist() == [1.0, 1.0]
    res = spatial_embedding_loss(pred, inst, cen, spacing)
    assert res.var.item() == 0.0
    assert res.seed.item() < 1e-3


def test_background_only_batch_is_finite_and_connected():
    pred = torch.randn(2, 7, 8, 8, 8, requires_grad=True)
    res = spatial_embedding_loss(pred, torch.zeros(2, 8, 8, 8, dtype=torch.int16),
                                 torch.zeros(2, 8, 8, 8, dtype=torch.bool), [0.1, 0.01, 0.01])  # fmt: skip
    res.loss.backward()
    assert torch.isfinite(res.loss) and res.inst.item() == 0 and res.var.item() == 0
    assert torch.isfinite(pred.grad).all() and pred.grad[:, 6].abs().sum() > 0  # only the seed gets gradient
    assert pred.grad[:, :6].abs().sum() == 0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="channels"):
        spatial_embedding_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), [1, 1])
    with pytest.raises(ValueError, match="must be"):
        spatial_embedding_loss(torch.zeros(1, 5, 8, 8), torch.zeros(1, 8, 9), torch.zeros(1, 8, 9), [1, 1])
    with pytest.raises(ValueError, match="spacing"):
        spatial_embedding_loss(torch.zeros(1, 5, 8, 8), torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), [1])


def _disc_crop(shape=(32, 32)):
    inst = torch.zeros(1, *shape, dtype=torch.int16)
    cen = torch.zeros(1, *shape, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    for i, (cy, cx, r) in enumerate([(8, 9, 5), (20, 22, 6), (24, 7, 4)], start=1):
        inst[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
        cen[0, cy, cx] = True
    image = (inst > 0).float()[:, None] + 0.1 * torch.randn(
        1, 1, *shape, generator=torch.Generator().manual_seed(0)
    )
    return image, inst, cen


def test_tiny_overfit_decreases_loss_with_finite_gradients():
    torch.manual_seed(0)
    image, inst, cen = _disc_crop()
    model = BranchedERFNet(2)
    model.init_output(2)
    # upstream's 256-pixel grid spacing: the initial bandwidth exp(10) then covers ~1.4 px around a centre
    crit = SpatialEmbLoss([1 / 255, 1 / 255], foreground_weight=10.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        res = crit(model(image), inst, cen)
        res.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(res.loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    assert object_ious(model(image), inst, cen, crit.spacing).mean() > 0.5


def test_loss_is_cheap_next_to_the_network():
    """Forward+backward time of the loss vs the network on a CPU batch of 8 crops of 64^2 (upstream-like)."""
    torch.manual_seed(1)
    model = BranchedERFNet(2)
    x = torch.randn(8, 1, 64, 64)
    pred, inst, cen = synthetic_batch(2, (64, 64), batch=8, seed=1)

    def time_it(fn, reps=3):  # best of reps: robust to other processes sharing the cores
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def net():
        model(x).sum().backward()

    def loss():
        p = pred.clone().requires_grad_(True)
        spatial_embedding_loss(p, inst, cen, [0.01, 0.01]).loss.backward()

    t_net, t_loss = time_it(net), time_it(loss)
    assert t_loss < t_net, (t_loss, t_net)
