"""EmbedSeg's spatial-embedding loss (Lovász hinge + seed regression + sigma variance), 2D and 3D.

Per crop b with objects k (unique nonzero instance ids), following upstream EmbedSeg 0.2.5 (method notes
section 4):

* embedding ``e_i = tanh(o_i) + p_i * spacing`` (``p_i`` the pixel index in the crop; the loss only sees
  differences, so crop-local coordinates give the same value as global ones);
* centre ``C_k``: coordinate of the object's single centre-image pixel, else the object's mean coordinate;
* bandwidth ``s_k`` = mean sigma logit over the object, per axis;
  ``phi_k = exp(-sum_d (e_d - C_d)^2 exp(10 s_d))``;
* ``L_inst`` = mean over objects of the binary Lovász hinge of logits ``2 phi_k - 1`` against the object mask;
* ``L_var`` = mean over objects of ``mean_{i in k, d} (s_{i,d} - stopgrad(s_k,d))^2``;
* ``L_seed`` = (sum_bg seed^2 + w_fg sum_k sum_{i in k} (seed_i - stopgrad(phi_k,i))^2) / pixels in the crop;
* ``L = mean_b (w_inst L_inst + w_var L_var + w_seed L_seed)``.

The objects of a crop are processed together as rows of a K x N matrix (N = pixels per crop; rows chunked
to bound memory): one small float64 matrix product gives every squared distance, one row-wise sort serves
every object's Lovász hinge (outside autograd), so the cost is ~K x N elementwise work with no Python loop
over objects. ``tests/test_loss.py`` checks it against a slow per-object implementation of the formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

# phi = exp(x) with x floored here (phi >= 2e-22, loss changed by < 1e-21): exp of x < -87 and the backward
# products of tiny phi land in float32's subnormal range, which is ~10x slower on x86 CPUs.
PHI_EXPONENT_FLOOR = -50.0
# Upper bound on K x N elements processed in one go (a few float tensors of this size live at once).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


class LossResult(NamedTuple):
    """``loss`` is the differentiable total; the parts are batch means (detached), for logging."""

    loss: torch.Tensor
    inst: torch.Tensor
    var: torch.Tensor
    seed: torch.Tensor
    ious: torch.Tensor | None  # IoU(phi_k > 0.5, in_k) per object of the batch, when asked for


def pixel_coordinates(shape: Sequence[int], spacing: Sequence[float], device=None) -> torch.Tensor:
    """Coordinates of every pixel of an array of ``shape``: ndim x prod(shape), embedding order x, y[, z].

    Row d pairs with array axis ``ndim - 1 - d`` (embedseg_deploy.contract.axis_of_dim); ``spacing`` is in
    array order.
    """
    ndim = len(shape)
    if len(spacing) != ndim:
        raise ValueError(f"spacing needs {ndim} values (array order), got {list(spacing)}")
    axes = [
        torch.arange(n, dtype=torch.float32, device=device) * float(s)
        for n, s in zip(shape, spacing, strict=True)
    ]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([grids[ndim - 1 - d].reshape(-1) for d in range(ndim)])


def lovasz_hinge_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary Lovász hinge (Berman et al. 2018) of every row: K x N logits and {0,1} labels -> K losses.

    Hinge errors ``1 - logit * (2y - 1)``, ReLU, dotted with the gradient of the Lovász extension of the
    Jaccard loss taken in the order of decreasing error.
    """
    signs = 2.0 * labels.float() - 1.0
    return _lovasz_of_errors(torch.relu(1.0 - logits * signs), labels.bool())


def _lovasz_of_errors(errors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász extension of the Jaccard loss at non-negative ``errors`` (K x N), rows independent.

    The sort only decides which Lovász-gradient entry each pixel gets, so it runs without autograd and the
    entries are scattered back to pixel order: the loss is then a plain ``sum(errors * g)`` whose backward
    needs no sort indices.
    """
    with torch.no_grad():
        perm = torch.argsort(errors, dim=1, descending=True)
        fg_before = labels.gather(1, perm).cumsum(1, dtype=torch.float32)  # fg pixels among the first i
        rank = torch.arange(1, errors.shape[1] + 1, device=errors.device, dtype=torch.float32)
        # Jaccard loss of the first i pixels mispredicted is 1 - q_i, q_i = |fg not in them| / |fg or them|
        kept = fg_before[:, -1:] - fg_before
        q = kept / (kept + rank)
        grad_sorted = torch.empty_like(q)
        grad_sorted[:, 0] = 1.0 - q[:, 0]
        torch.sub(q[:, :-1], q[:, 1:], out=grad_sorted[:, 1:])
        grad = torch.empty_like(grad_sorted).scatter_(1, perm, grad_sorted)
    return (errors * grad).sum(1)


class _Objects(NamedTuple):
    image: torch.Tensor  # K: batch index of each object (objects are sorted by image)
    ident: torch.Tensor  # K: instance id
    count: torch.Tensor  # K: pixels per object
    first_pixel: torch.Tensor  # K + 1: start of each object's run in the pixel lists below
    pixel_obj: torch.Tensor  # M: object index of each foreground pixel, grouped by object
    pixel_pos: torch.Tensor  # M: flat index of that pixel within its crop
    pixel_img: torch.Tensor  # M: batch index of that pixel


def _find_objects(instances: torch.Tensor) -> _Objects:
    """Number the objects of a B x N instance batch (sorted by image, then id) and list their pixels."""
    img, pos = torch.nonzero(instances > 0, as_tuple=True)
    ids = instances[img, pos].long()
    stride = int(ids.max()) + 1 if ids.numel() else 1
    keys, pixel_obj = torch.unique(img * stride + ids, return_inverse=True)
    order = torch.argsort(pixel_obj, stable=True)
    count = torch.bincount(pixel_obj, minlength=keys.numel())
    first = torch.zeros(keys.numel() + 1, dtype=torch.long, device=instances.device)
    first[1:] = count.cumsum(0)
    return _Objects(keys // stride, keys % stride, count, first, pixel_obj[order], pos[order], img[order])


def _centres(objs: _Objects, centers: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """K x ndim centre per object: its single centre pixel, else its mean pixel coordinate."""
    k, ndim = objs.image.numel(), coords.shape[0]
    pix_coords = coords[:, objs.pixel_pos].T  # M x ndim
    mean = torch.zeros(k, ndim, device=coords.device).index_add_(0, objs.pixel_obj, pix_coords)
    mean /= objs.count[:, None].float()
    is_centre = centers[objs.pixel_img, objs.pixel_pos].bool()
    n_centre = torch.bincount(objs.pixel_obj[is_centre], minlength=k)
    at_centre = torch.zeros(k, ndim, device=coords.device).index_add_(
        0, objs.pixel_obj[is_centre], pix_coords[is_centre]
    )
    return torch.where((n_centre == 1)[:, None], at_centre, mean)


def _per_image_mean(values: torch.Tensor, image: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean of per-object ``values`` within each image (0 for images without objects)."""
    total = torch.zeros(batch, dtype=values.dtype, device=values.device).index_add(0, image, values)
    count = torch.bincount(image, minlength=batch).clamp(min=1)
    return total / count


def spatial_embedding_loss(
    prediction: torch.Tensor,
    instances: torch.Tensor,
    centers: torch.Tensor,
    spacing: Sequence[float],
    foreground_weight: float = 10.0,
    w_inst: float = 1.0,
    w_var: float = 10.0,
    w_seed: float = 1.0,
    compute_iou: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> LossResult:
    """The EmbedSeg loss of a batch (see the module docstring).

    ``prediction``: B x (2 ndim + 1) x spatial raw network output; ``instances``: B x spatial integer ids
    (0 = background); ``centers``: B x spatial bool centre image (one pixel per object); ``spacing``:
    embedding units per pixel in array order. The prediction is evaluated in float32 (AMP-safe).
    """
    ndim = prediction.dim() - 2
    batch, spatial = prediction.shape[0], tuple(prediction.shape[2:])
    if prediction.shape[1] != 2 * ndim + 1:
        raise ValueError(f"prediction needs {2 * ndim + 1} channels for {ndim}D, got {prediction.shape[1]}")
    if tuple(instances.shape) != (batch, *spatial) or tuple(centers.shape) != (batch, *spatial):
        raise ValueError(
            f"instances {tuple(instances.shape)} and centers {tuple(centers.shape)} must be "
            f"{(batch, *spatial)} to match the prediction"
        )
    pred = prediction.float().reshape(batch, 2 * ndim + 1, -1)
    n = pred.shape[2]
    inst_flat = instances.reshape(batch, n)
    centers_flat = centers.reshape(batch, n)
    # Crop-local coordinates, shifted so the crop's middle is 0: the loss only sees differences, and small
    # magnitudes keep the expanded squared distance below accurate.
    coords = pixel_coordinates(spatial, spacing, device=pred.device)  # ndim x N
    coords = coords - coords[:, -1:] / 2

    emb = torch.tanh(pred[:, :ndim]) + coords  # B x ndim x N
    sigma = pred[:, ndim : 2 * ndim]  # B x ndim x N
    seed = torch.sigmoid(pred[:, 2 * ndim])  # B x N

    seed_bg = (seed.square() * (inst_flat == 0)).sum(1)  # B
    objs = _find_objects(inst_flat)
    k = objs.image.numel()
    if k == 0:
        zero = pred.new_zeros(())
        seed_term = seed_bg / n
        total = (w_seed * seed_term).mean() + 0.0 * prediction.sum()
        ious = pred.new_zeros(0) if compute_iou else None
        return LossResult(total, zero, zero, seed_term.detach().mean(), ious)

    # per-object bandwidth (mean sigma logit) and variance of the sigma logits around it
    sig_pix = sigma[objs.pixel_img, :, objs.pixel_pos]  # M x ndim
    s_mean = torch.zeros(k, ndim, device=pred.device).index_add(0, objs.pixel_obj, sig_pix)
    s_mean = s_mean / objs.count[:, None].float()
    sq_dev = (sig_pix - s_mean.detach()[objs.pixel_obj]).square().sum(1)
    var_obj = torch.zeros(k, device=pred.device).index_add(0, objs.pixel_obj, sq_dev)
    var_obj = var_obj / (objs.count.float() * ndim)

    # sum_d w_d (e_d - c_d)^2 = sum_d w_d e_d^2 - 2 w_d c_d e_d + w_d c_d^2: one small matrix product per
    # image instead of K x ndim x N temporaries; float64 keeps the expansion free of cancellation.
    centre = _centres(objs, centers_flat, coords).double()  # K x ndim
    bandwidth = torch.exp(10.0 * s_mean).double()  # K x ndim
    # negated, so that the product is the exponent of phi directly
    coef = torch.cat([-bandwidth, 2.0 * bandwidth * centre, -(bandwidth * centre.square()).sum(1, True)], 1)
    emb64 = emb.double()
    feats = torch.cat([emb64.square(), emb64, torch.ones_like(emb64[:, :1])], 1)  # B x (2 ndim + 1) x N

    first_obj = torch.zeros(batch + 1, dtype=torch.long)
    first_obj[1:] = torch.bincount(objs.image, minlength=batch).cumsum(0).cpu()
    first_pix = objs.first_pixel.cpu().tolist()
    rows = max(1, chunk_elements // max(n, 1))
    lovasz, ious, seed_fg = [], [], []
    for b in range(batch):
        seed_fg_b = seed.new_zeros(())
        for k0 in range(int(first_obj[b]), int(first_obj[b + 1]), rows):
            k1 = min(k0 + rows, int(first_obj[b + 1]))
            phi = torch.exp((coef[k0:k1] @ feats[b]).float().clamp_(PHI_EXPONENT_FLOOR, 0.0))  # k x N
            p0, p1 = first_pix[k0], first_pix[k1]
            row, pos = objs.pixel_obj[p0:p1] - k0, objs.pixel_pos[p0:p1]
            mask = torch.zeros(k1 - k0, n, dtype=torch.bool, device=pred.device)
            mask[row, pos] = True
            # hinge errors of the logits 2 phi - 1: 2 (1 - phi) inside the object, 2 phi outside (all >= 0);
            # the Lovász extension is positively homogeneous, so the factor 2 moves outside
            lovasz.append(2.0 * _lovasz_of_errors(torch.where(mask, 1.0 - phi, phi), mask))
            # seed regression inside each object onto its phi (no gradient into phi)
            seed_fg_b = seed_fg_b + (seed[b, pos] - phi[row, pos].detach()).square().sum()
            if compute_iou:
                with torch.no_grad():
                    hit = phi > 0.5
                    ious.append((hit & mask).sum(1).float() / (hit | mask).sum(1).float())
        seed_fg.append(seed_fg_b)

    inst_img = _per_image_mean(torch.cat(lovasz), objs.image, batch)
    var_img = _per_image_mean(var_obj, objs.image, batch)
    seed_img = (seed_bg + foreground_weight * torch.stack(seed_fg)) / n
    total = (w_inst * inst_img + w_var * var_img + w_seed * seed_img).mean() + 0.0 * prediction.sum()
    return LossResult(
        total,
        inst_img.detach().mean(),
        var_img.detach().mean(),
        seed_img.detach().mean(),
        torch.cat(ious) if compute_iou else None,
    )


class SpatialEmbLoss(nn.Module):
    """Module wrapper of :func:`spatial_embedding_loss` holding the spacing, foreground weight and weights."""

    def __init__(
        self,
        spacing: Sequence[float],
        foreground_weight: float = 10.0,
        w_inst: float = 1.0,
        w_var: float = 10.0,
        w_seed: float = 1.0,
    ):
        super().__init__()
        self.spacing = [float(s) for s in spacing]
        self.foreground_weight = float(foreground_weight)
        self.weights = (float(w_inst), float(w_var), float(w_seed))

    def forward(
        self,
        prediction: torch.Tensor,
        instances: torch.Tensor,
        centers: torch.Tensor,
        compute_iou: bool = False,
    ) -> LossResult:
        w_inst, w_var, w_seed = self.weights
        return spatial_embedding_loss(
            prediction,
            instances,
            centers,
            self.spacing,
            self.foreground_weight,
            w_inst,
            w_var,
            w_seed,
            compute_iou,
        )


def object_ious(
    prediction: torch.Tensor, instances: torch.Tensor, centers: torch.Tensor, spacing: Sequence[float]
) -> torch.Tensor:
    """Upstream's validation IoU(phi_k > 0.5, in_k) for every object of the batch (average over objects)."""
    with torch.no_grad():
        return spatial_embedding_loss(prediction, instances, centers, spacing, compute_iou=True).ious
