"""Volumization: an image becomes a depth-stack of its patches, ranked by a metric (volumization paper §4.1).

``volumize`` splits an (N, C, H, W) batch in [0, 1] into the D = (H/ph)(W/pw)
non-overlapping ph x pw patches of each image (pixel conservation, Eq. 4),
scores every patch with a metric of Table 1, sorts the patches by score and
stacks them as a volume of shape (N, C, D, ph, pw) -- the layout ``nn.Conv3d``
expects, depth being the patch axis.  It also returns the order, (N, D) with
``volume[n, :, k] = patch order[n, k]`` of image n (patches numbered row-major
over the patch grid), so :func:`unvolumize` puts every pixel back exactly.

Metrics (:data:`METRICS`), computed over all C*ph*pw values of a patch (the
channels share one intensity histogram); histograms have ``bins`` equal bins
over [0, 1] (value v falls in bin ``min(floor(v * bins), bins - 1)``), p is a
normalized histogram, logs are base 2 (bits):

* ``entropy`` (standalone): H(x) = -sum_i p_x(i) log p_x(i).  The paper's
  ``sum b(i) log(N / b(i))`` is, with b counts and N pixels, N * H(x): the same
  order for patches of one size.
* ``joint-entropy``: JE(x, r) = -sum_ij p_xr(i, j) log p_xr(i, j), p_xr the
  joint histogram of co-located values (bins x bins).  The paper's formula
  lacks the minus sign; without it JE would be <= 0 and "ascending" would
  mean "most complex first", so we use Shannon's sign.
* ``mutual-information``: MI(x, r) = H(x) + H(r) - JE(x, r) (Table 1).
* ``kl``: KL(x || r) = sum_i p_x(i) log(p_x(i) / p_r(i)), both histograms
  mixed with a uniform 1e-6 so a bin empty in r gives a large, finite
  divergence.  (The paper's formula weights by pixel values x_1i, not by the
  histogram; we use the standard divergence between the two histograms.)
* ``mse``: mean of (x - r)^2 over the C*ph*pw values.
* ``psnr``: 10 log10(1 / mse) in dB for MAX = 1 (the paper's
  20 log10(MAX / sqrt(MSE))), mse clamped at 1e-10 (at most 100 dB).
* ``max-norm``: max |x - r| (the Chebyshev distance; the paper writes
  ``max(x_1, ..., x_n)``, which is a distance only if applied to x - r).

The reference r of a distance metric is a patch tensor the caller gives, or
by default the image's lowest-entropy patch (the first in row-major order on
ties), as in the paper.

**Orientation.**  Ranking uses :func:`metric_scores`, oriented so that lower
means simpler / closer to the reference: entropy, JE, KL, MSE and max-norm as
they are; the two similarities are negated (score = -MI, -PSNR).  So
``order="ascending"`` always runs from the simplest / most reference-like patch
to the least, and ``"descending"`` is exactly its reverse.  Ties (common:
blank background patches) are broken by entropy, then by row-major position;
scores are rounded to 1e-9 first, so float noise does not split true ties.
With the default reference, the reference patch itself ranks first for every
metric (it has the least entropy, zero distance to itself, and JE(x, r) >=
H(x) >= H(r), MI(x, r) <= H(r) = MI(r, r)).  Note MI is degenerate for a blank
reference (MI(x, const) = 0 for all x): the order then falls back to entropy.

Scores are computed under ``no_grad`` (the order is piecewise constant in the
pixels); the volume itself is a gather, so gradients flow to the input pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from keyedge.errors import KeyedgeError, ShapeError

METRICS = ("entropy", "mutual-information", "kl", "psnr", "mse", "max-norm", "joint-entropy")
ORDERS = ("ascending", "descending")
_KL_EPS = 1e-6
_MSE_FLOOR = 1e-10


def _pair(patch: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return int(ph), int(pw)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise KeyedgeError(f"unknown volumization metric {metric!r}", f"use one of {', '.join(METRICS)}")
    return metric


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise KeyedgeError(f"unknown order {order!r}", "use ascending or descending")
    return order


def check_patch(height: int, width: int, patch: int | tuple[int, int]) -> tuple[int, int]:
    """Raise :class:`ShapeError` unless the ph x pw patch tiles an H x W image exactly."""
    ph, pw = _pair(patch)
    if ph < 1 or pw < 1:
        raise ShapeError(f"patch size must be positive, got {ph}x{pw}")
    if height % ph or width % pw:
        raise ShapeError(
            f"image is {height}x{width} (HxW): patch {ph}x{pw} does not tile it",
            f"use a patch size dividing both sides, or resize to {height - height % ph}x{width - width % pw}",
        )
    return ph, pw


def to_patches(images: torch.Tensor, patch: int | tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, D, C, ph, pw): the non-overlapping patches in row-major grid order."""
    if images.ndim != 4:
        raise ShapeError(f"expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    ph, pw = check_patch(h, w, patch)
    grid = images.reshape(n, c, h // ph, ph, w // pw, pw)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // ph) * (w // pw), c, ph, pw)


def from_patches(patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_patches`: (N, D, C, ph, pw) -> (N, C, H, W)."""
    n, d, c, ph, pw = patches.shape
    check_patch(height, width, (ph, pw))
    if d != (height // ph) * (width // pw):
        raise ShapeError(f"{d} patches of {ph}x{pw} do not make a {height}x{width} image")
    grid = patches.reshape(n, height // ph, width // pw, c, ph, pw)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)


# -- metrics ------------------------------------------------------------------------------------------------------


def _bin_index(values: torch.Tensor, bins: int) -> torch.Tensor:
    edges = torch.linspace(0.0, 1.0, bins + 1, device=values.device, dtype=values.dtype)[1:-1]
    return torch.bucketize(values.contiguous(), edges, right=True)  # floor(v * bins), clamped to [0, bins - 1]


def _histograms(index: torch.Tensor, bins: int) -> torch.Tensor:
    """(G, K, L) bin indices -> (G, K, bins) normalized histograms, all at once (scatter_add, no loops)."""
    counts = torch.zeros(*index.shape[:-1], bins, dtype=torch.float64, device=index.device)
    counts.scatter_add_(-1, index, torch.ones_like(index, dtype=torch.float64))
    return counts / index.shape[-1]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1) / torch.log(torch.tensor(2.0, dtype=p.dtype))


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    bins = p.shape[-1]
    p, q = (p + _KL_EPS) / (1 + bins * _KL_EPS), (q + _KL_EPS) / (1 + bins * _KL_EPS)
    return (p * (torch.log2(p) - torch.log2(q))).sum(-1)


@torch.no_grad()
def metric_scores(
    items: torch.Tensor, metric: str, *, reference: torch.Tensor | None = None, bins: int = 32
) -> torch.Tensor:
    """Ranking scores (G, K) of K items per group, float64, oriented so that lower = simpler / closer.

    ``items`` is (G, K, ...) with values in [0, 1]: G groups (images, or one
    batch) of K items (patches, or images) of equal size.  ``reference`` is
    (G, ...) or one item (...) shared by all groups; ``None`` picks each
    group's lowest-entropy item.  See the module docstring for the formulas.
    """
    check_metric(metric)
    if bins < 2:
        raise KeyedgeError(f"histograms need at least 2 bins, got {bins}")
    g, k = items.shape[:2]
    flat = items.detach().reshape(g, k, -1)
    index = _bin_index(flat, bins) if metric in ("entropy", "mutual-information", "kl", "joint-entropy") else None
    hist = _histograms(index, bins) if index is not None else None
    if metric == "entropy":
        return _entropy(hist)
    ref, ref_index, ref_hist = _reference(flat, index, hist, reference, bins)
    if metric == "mse" or metric == "psnr":
        mse = (flat.double() - ref.double().unsqueeze(1)).pow(2).mean(-1)
        return mse if metric == "mse" else 10 * torch.log10(mse.clamp_min(_MSE_FLOOR))  # = -PSNR
    if metric == "max-norm":
        return (flat.double() - ref.double().unsqueeze(1)).abs().amax(-1)
    if metric == "kl":
        return _kl(hist, ref_hist.unsqueeze(1))
    joint = _histograms(index * bins + ref_index.unsqueeze(1), bins * bins)
    je = _entropy(joint)
    if metric == "joint-entropy":
        return je
    return je - _entropy(hist) - _entropy(ref_hist).unsqueeze(1)  # = -MI


def _reference(
    flat: torch.Tensor, index: torch.Tensor | None, hist: torch.Tensor | None, reference: torch.Tensor | None, bins: int
):
    """The reference item per group (G, L), with its bin indices and histogram when the metric needs them."""
    g, _, length = flat.shape
    if reference is None:
        own_hist = hist if hist is not None else _histograms(_bin_index(flat, bins), bins)
        pick = torch.round(_entropy(own_hist), decimals=9).argmin(1)  # the first lowest-entropy item per group
        rows = torch.arange(g, device=flat.device)
        ref = flat[rows, pick]
        if index is not None:
            return ref, index[rows, pick], hist[rows, pick]
        return ref, None, None
    ref = reference.detach().to(flat.device, flat.dtype)
    if ref.numel() == length:
        ref = ref.reshape(1, length).expand(g, length)
    elif ref.numel() == g * length:
        ref = ref.reshape(g, length)
    else:
        raise ShapeError(
            f"the reference has shape {tuple(reference.shape)}, not the shape of one item "
            f"({length} values) or one per group ({g} x {length})",
            "give a patch-sized tensor",
        )
    if index is None:
        return ref, None, None
    ref_index = _bin_index(ref, bins)
    return ref, ref_index, _histograms(ref_index.unsqueeze(1), bins).squeeze(1)


@torch.no_grad()
def rank(
    items: torch.Tensor,
    metric: str = "entropy",
    order: str = "ascending",
    *,
    reference: torch.Tensor | None = None,
    bins: int = 32,
) -> torch.Tensor:
    """The (G, K) order of the items of each group by :func:`metric_scores` (ties: entropy, then position)."""
    check_order(order)
    scores = torch.round(metric_scores(items, metric, reference=reference, bins=bins), decimals=9)
    if metric == "entropy":
        key_order = torch.sort(scores, dim=1, stable=True).indices
    else:
        entropy = torch.round(metric_scores(items, "entropy", bins=bins), decimals=9)
        by_entropy = torch.sort(entropy, dim=1, stable=True).indices
        by_score = torch.sort(scores.gather(1, by_entropy), dim=1, stable=True).indices
        key_order = by_entropy.gather(1, by_score)
    return key_order.flip(1) if order == "descending" else key_order


# -- volumes ------------------------------------------------------------------------------------------------------


def volumize(
    images: torch.Tensor,
    patch: int | tuple[int, int] = 16,
    metric: str = "entropy",
    order: str = "ascending",
    *,
    bins: int = 32,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) in [0, 1] -> (volume (N, C, D, ph, pw), order (N, D)); see the module docstring.

    ``reference``: a (C, ph, pw) patch, or (N, C, ph, pw) one per image, for the
    distance metrics; ``None`` takes each image's lowest-entropy patch.
    """
    patches = to_patches(images, patch)  # (N, D, C, ph, pw)
    perm = rank(patches, metric, order, reference=reference, bins=bins)
    n, d = perm.shape
    gathered = patches.reshape(n, d, -1).gather(1, perm.unsqueeze(-1).expand(-1, -1, patches[0, 0].numel()))
    volume = gathered.reshape(patches.shape).transpose(1, 2)  # (N, C, D, ph, pw)
    return volume, perm


def unvolumize(volume: torch.Tensor, order: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Put the patches of a volume back where :func:`volumize` took them from: (N, C, H, W), exactly."""
    if volume.ndim != 5 or order.shape != (volume.shape[0], volume.shape[2]):
        raise ShapeError(
            f"expected a volume (N, C, D, ph, pw) and an order (N, D), got {tuple(volume.shape)} "
            f"and {tuple(order.shape)}"
        )
    patches = volume.transpose(1, 2)  # (N, D, C, ph, pw), in ranked order
    n, d = order.shape
    inverse = torch.argsort(order, dim=1)  # patch j of the image sits at depth inverse[j]
    flat = patches.reshape(n, d, -1).gather(1, inverse.unsqueeze(-1).expand(-1, -1, patches[0, 0].numel()))
    return from_patches(flat.reshape(patches.shape), height, width)


@dataclass
class VolumizeConfig:
    """How images become volumes: patch size (ph, pw), ranking metric, order, histogram bins."""

    patch: tuple[int, int] = (16, 16)
    metric: str = "entropy"
    order: str = "ascending"
    bins: int = 32

    def __post_init__(self) -> None:
        self.patch = _pair(self.patch)
        if min(self.patch) < 1:
            raise KeyedgeError(f"patch size must be positive, got {self.patch[0]}x{self.patch[1]}")
        check_metric(self.metric)
        check_order(self.order)
        if self.bins < 2:
            raise KeyedgeError(f"histograms need at least 2 bins, got {self.bins}")

    def depth(self, height: int, width: int) -> int:
        """D, the number of patches of an H x W image (checked to tile exactly)."""
        ph, pw = check_patch(height, width, self.patch)
        return (height // ph) * (width // pw)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "patch": list(self.patch)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VolumizeConfig:
        return cls(tuple(data["patch"]), data["metric"], data["order"], int(data["bins"]))


class Volumizer(nn.Module):
    """``forward(images (N, C, H, W)) -> volume (N, C, D, ph, pw)``; :meth:`volumize` also gives the order.

    A fixed ``reference`` patch (C, ph, pw) is kept as a non-persistent buffer
    (not in state dicts): checkpoints record the config only, so a model
    trained with a custom reference must be given it again.
    """

    def __init__(self, config: VolumizeConfig | None = None, reference: torch.Tensor | None = None):
        super().__init__()
        self.config = config or VolumizeConfig()
        self.register_buffer("reference", reference, persistent=False)

    def volumize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return volumize(images, cfg.patch, cfg.metric, cfg.order, bins=cfg.bins, reference=self.reference)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.volumize(images)[0]

    def extra_repr(self) -> str:
        cfg = self.config
        return f"patch={cfg.patch[0]}x{cfg.patch[1]}, metric={cfg.metric}, order={cfg.order}, bins={cfg.bins}"
