"""Loss landscapes: filter-normalized random directions, 1D lines, 2D planes, interpolation.

Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets" (NeurIPS
2018) plot ``L(w + a d1 + b d2)`` along random directions whose every filter is rescaled to the
norm of the matching filter of ``w``:

    d_{l,j} <- d_{l,j} / ||d_{l,j}|| * ||w_{l,j}||,

which removes the scale invariance of ReLU/BatchNorm networks, so that curvature seen in the
plots can be compared across models. Biases and BatchNorm parameters (1-D tensors) are set to
zero by default, as in their code's ``ignore='biasbn'``; ``bias_bn="weight"`` uses the weight
itself (their other option) and ``bias_bn="filter"`` treats each entry as its own filter.
Huang et al. ("Understanding Generalization through Visualizations", 2020) use the same plots.

All functions return arrays (tensors), no plotting. Many weight sets are evaluated per forward
pass with ``torch.func.vmap`` over stacked parameters (``chunk_size`` of them at a time), not one
Python iteration per grid point, where that is faster: by default each evaluator times both ways
on its first points (:meth:`PointEvaluator._decide`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flatminima._checks import check_choice, check_optional_positive_int
from flatminima._nn import LossFn, filter_rows, gaussian_like, model_device
from flatminima._params import (
    FlatParams,
    ParamSpec,
    as_batches,
    batch_weights,
    measuring_mode,
    select_params,
)

NORMS = ("filter", "layer", "global", "none")
BIAS_BN = ("zero", "weight", "filter")


@dataclass
class Landscape:
    """Loss and accuracy at each point (shape of the coordinate grid), plus the coordinates.

    ``accuracy`` is NaN where the outputs are not class scores ``(batch, classes)`` with integer
    targets.
    """

    loss: Tensor
    accuracy: Tensor
    coords: tuple[Tensor, ...]


def normalize_direction(
    direction: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    *,
    norm: str = "filter",
    bias_bn: str = "zero",
) -> dict[str, Tensor]:
    """Rescale ``direction`` to the weights' scale (Li et al. 2018, Sec. 4).

    ``norm``: ``"filter"`` (each slice along dim 0 gets the norm of the matching slice of ``w``),
    ``"layer"`` (each tensor), ``"global"`` (the whole direction gets ``||w||``) or ``"none"``.
    ``bias_bn`` decides 1-D tensors (biases, norm-layer scales) for the ``filter``/``layer``
    rules: ``"zero"``, ``"weight"`` (the direction is ``w`` itself) or ``"filter"``.
    """
    check_choice(norm, NORMS, "direction norm")
    check_choice(bias_bn, BIAS_BN, "bias_bn rule")
    out: dict[str, Tensor] = {}
    if norm == "global":
        d_norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction.values()))
        w_norm = torch.sqrt(sum((weights[n].double() ** 2).sum() for n in direction))
        factor = float(w_norm / d_norm.clamp_min(1e-30))
        return {n: d * factor for n, d in direction.items()}
    for name, d in direction.items():
        w = weights[name].detach()
        if norm == "none":
            out[name] = d.clone()
            continue
        if w.dim() <= 1 and bias_bn != "filter":
            out[name] = torch.zeros_like(d) if bias_bn == "zero" else w.clone()
            continue
        if norm == "layer":
            out[name] = d * (w.norm() / d.norm().clamp_min(1e-30))
            continue
        rows_d, rows_w = filter_rows(d), filter_rows(w)
        scale = rows_w.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(
            1e-30)
        out[name] = (rows_d * scale).reshape(d.shape)
    return out


def random_direction(
    model: nn.Module,
    *,
    params: ParamSpec = None,
    norm: str = "filter",
    bias_bn: str = "zero",
    generator: torch.Generator | None = None,
    example_input: Tensor | None = None,
) -> dict[str, Tensor]:
    """A Gaussian random direction over the selected parameters, normalized by ``norm``.

    ``params="last_layer"`` finds the last layer in execution order when ``example_input`` (a
    few inputs) is given, else in registration order (see
    :func:`flatminima._params.last_layer_names`).

    Example (Li et al.'s 2D plot)::

        g = torch.Generator().manual_seed(0)
        d1, d2 = (fm.landscape.random_direction(model, generator=g) for _ in range(2))
        res = fm.landscape.plane(model, F.cross_entropy, loader, d1, d2,
                                 torch.linspace(-1, 1, 21), torch.linspace(-1, 1, 21))
    """
    selected = select_params(model, params, example_input)
    raw = gaussian_like(selected, generator)
    return normalize_direction(raw, {n: p.detach() for n, p in selected.items()}, norm=norm,
                               bias_bn=bias_bn)


def _check_directions(model: nn.Module, directions: Sequence[Mapping[str, Tensor]]
                      ) -> list[str]:
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    names = list(directions[0])
    if not names:
        raise ValueError("direction is empty: it names no parameter")
    for i, d in enumerate(directions):
        if set(d) != set(names):   # the order does not matter: entries are taken by name
            raise ValueError(f"direction {i} names different parameters than direction 0")
        for n, t in d.items():
            if n not in state:
                raise ValueError(f"model has no parameter or buffer named {n!r}")
            if t.shape != state[n].shape:
                raise ValueError(f"direction entry {n!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(state[n].shape)}")
    return names


class PointEvaluator:
    """Loss and accuracy of ``model`` at many flat weight vectors, ``chunk_size`` per pass.

    ``names`` are the parameters (or floating-point buffers) that vary; everything else stays
    at the model's values. ``w0`` is their flat vector at the model. :meth:`run` takes a
    function ``points(start, stop) -> (stop - start, n)`` so callers build each chunk of weight
    sets lazily (a grid ``w0 + C @ D``, a set of rays ``w0 + t_r u_r``) without materializing
    all of them.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: object,
        names: Sequence[str],
        *,
        chunk_size: int | None = None,
        train: bool = False,
    ) -> None:
        chunk_size = check_optional_positive_int(chunk_size, "chunk_size")
        self.model = model
        self.loss_fn = torch.nn.functional.cross_entropy if loss_fn is None else loss_fn
        self.batches = as_batches(data, model_device(model))
        self.weights = batch_weights(self.batches)
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        base = {n: state[n].detach() for n in names}
        self.flat = FlatParams.of(base)
        self.w0 = self.flat.flatten(base)
        self.fixed = {n: t.detach() for n, t in state.items() if n not in base}
        self.train = train
        per_point = max(1, self.w0.numel() * self.w0.element_size())
        self.max_chunk = int(max(1, min(64, (256 * 2**20) // per_point)))
        # BatchNorm cannot update running statistics under vmap: train mode goes point by point.
        # None: decided by timing both ways on the first points evaluated (see _decide).
        self.chunk_size: int | None = 1 if train else chunk_size

    def _run_chunk(self, points: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        def one(wf: Tensor) -> tuple[Tensor, Tensor]:
            out = functional_call(self.model, {**self.fixed, **self.flat.unflatten(wf)}, (x,))
            return self.loss_fn(out, y), _accuracy(out, y)

        if points.shape[0] == 1:
            loss, acc = one(points[0])
            return loss.reshape(1), acc.reshape(1)
        return vmap(one)(points)

    def run(self, points: Callable[[int, int], Tensor], num_points: int
            ) -> tuple[Tensor, Tensor]:
        """``(loss, accuracy)``, each ``(num_points,)`` float64 on the CPU."""
        total_loss = torch.zeros(num_points, dtype=torch.float64)
        total_acc = torch.zeros(num_points, dtype=torch.float64)
        with measuring_mode(self.model, self.train), torch.no_grad():
            # Weight sets are built max_chunk at a time (bounded memory) and evaluated per batch
            # in pieces of chunk_size: max_chunk (vmapped) or 1.
            step = 1 if self.chunk_size == 1 else max(self.max_chunk, self.chunk_size or 1)
            for start in range(0, num_points, step):
                stop = min(num_points, start + step)
                chunk = points(start, stop).to(device=self.w0.device, dtype=self.w0.dtype)
                for weight, (x, y) in zip(self.weights, self.batches, strict=True):
                    if self.chunk_size is None:
                        loss, acc = self._decide(chunk, x, y)
                    else:
                        loss, acc = self._evaluate(chunk, x, y)
                    total_loss[start:stop] += weight * loss
                    total_acc[start:stop] += weight * acc
        return total_loss, total_acc

    def _evaluate(self, chunk: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and accuracy (float64, CPU) of each weight set in ``chunk`` on one batch, in
        vmapped pieces of ``chunk_size`` (point by point where vmap cannot batch a module)."""
        losses = [torch.zeros(0, dtype=torch.float64)]
        accs = [torch.zeros(0, dtype=torch.float64)]
        i = 0
        while i < chunk.shape[0]:
            piece = chunk[i : i + (self.chunk_size or 1)]
            try:
                loss, acc = self._run_chunk(piece, x, y)
            except RuntimeError as err:  # a module vmap cannot batch: point by point from now
                if piece.shape[0] == 1:
                    raise
                warnings.warn(f"vmap failed ({err}); evaluating one point at a time",
                              RuntimeWarning, stacklevel=3)
                self.chunk_size = 1
                continue
            losses.append(loss.double().cpu())
            accs.append(acc.double().cpu())
            i += piece.shape[0]
        return torch.cat(losses), torch.cat(accs)

    def _decide(self, chunk: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluate the first chunk on the first batch while choosing ``chunk_size``: a few
        weight sets one pass each, as many again in one vmapped pass, both timed; the faster
        way (``max_chunk`` or 1) does the rest. Every timed evaluation is used, so the choice
        costs 4 points evaluated the slower way, plus an untimed vmapped warm-up on 2 points
        and 2 inputs (the first vmapped call in a process pays one-time set-up costs, larger
        than a small model's whole evaluation, which alone would make vmap lose on an MLP).

        Neither way is faster everywhere. On a CPU a small BatchNorm CNN and ResNet-18 evaluate
        *slower* vmapped (vmap turns each convolution into a grouped one over permuted,
        non-contiguous activations, and max-pooling and BatchNorm copy them back), while an MLP
        is faster vmapped (one batched matrix product per layer instead of many small ones):
        measured in ``benchmarks/results/landscape.md``.
        """
        probe = min(4, chunk.shape[0] // 2)
        if probe == 0:   # one point (a basin's center): decide later
            return self._evaluate(chunk, x, y)
        self.chunk_size = 1
        if self.max_chunk == 1:   # one weight set fills the memory meant for a chunk
            return self._evaluate(chunk, x, y)
        try:  # untimed: the first vmapped call in a process pays one-time costs (see above)
            self._run_chunk(chunk[:2], x[:2], y[:2])
        except RuntimeError:  # a module vmap cannot batch
            return self._evaluate(chunk, x, y)
        t0 = time.perf_counter()
        one_by_one = self._evaluate(chunk[:probe], x, y)   # results on the CPU: synchronized
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss, acc = self._run_chunk(chunk[probe : 2 * probe], x, y)
        vmapped = (loss.double().cpu(), acc.double().cpu())
        t_vmap = time.perf_counter() - t0
        self.chunk_size = self.max_chunk if t_vmap < t_one else 1
        rest = self._evaluate(chunk[2 * probe :], x, y)
        return (torch.cat([one_by_one[0], vmapped[0], rest[0]]),
                torch.cat([one_by_one[1], vmapped[1], rest[1]]))


def evaluate(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
    *,
    chunk_size: int | None = None,
    train: bool = False,
) -> tuple[Tensor, Tensor]:
    """Loss and accuracy at ``w + sum_j coords[p, j] * directions[j]`` for every row ``p``.

    ``directions`` are dicts over the same parameter (or float buffer) names; ``coords`` is
    ``(P, len(directions))``. Returns ``(loss, accuracy)``, each ``(P,)`` float64, the loss being
    the size-weighted mean of ``loss_fn`` over the batches of ``data``. Weight sets are stacked
    ``chunk_size`` at a time and run through one vmapped forward pass; ``chunk_size=1`` runs
    one pass per point. The default times both on the first few points and keeps the faster:
    vmapped passes of as many weight sets as fit in about 256 MB (at most 64), or one pass per
    point (vmap is slower for convolutional networks on a CPU: measured in
    ``benchmarks/results/landscape.md``).
    ``train=True`` evaluates in train mode one point at a time (BatchNorm statistics cannot be
    updated under vmap) and restores buffers.
    """
    if len(directions) == 0:
        raise ValueError("need at least one direction")
    coords = torch.as_tensor(coords, dtype=torch.float64)
    if coords.dim() != 2 or coords.shape[1] != len(directions):
        raise ValueError(f"coords must have shape (points, {len(directions)}), "
                         f"got {tuple(coords.shape)}")
    names = _check_directions(model, directions)
    ev = PointEvaluator(model, loss_fn, data, names, chunk_size=chunk_size, train=train)
    dmat = torch.stack([ev.flat.flatten(d).to(ev.w0) for d in directions])  # (D, n)
    c = coords.to(device=ev.w0.device, dtype=ev.w0.dtype)
    return ev.run(lambda a, b: ev.w0 + c[a:b] @ dmat, coords.shape[0])


def _accuracy(out: object, y: Tensor) -> Tensor:
    if not isinstance(out, Tensor):   # a tuple or dict the user's loss_fn unpacks
        return torch.full((), float("nan"), device=y.device)
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        return (out.argmax(dim=1) == y).to(out.dtype).mean()
    return torch.full((), float("nan"), dtype=out.dtype, device=out.device)


def _coords_1d(alphas: Tensor | Sequence[float], name: str) -> Tensor:
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    if a.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} must be finite")
    return a


def line(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    direction: Mapping[str, Tensor],
    alphas: Tensor | Sequence[float],
    *,
    chunk_size: int | None = None,
    train: bool = False,
) -> Landscape:
    """Loss and accuracy along ``w + a * direction`` for each ``a`` in ``alphas`` (1D plot)."""
    a = _coords_1d(alphas, "alphas")
    loss, acc = evaluate(model, loss_fn, data, [direction], a[:, None], chunk_size=chunk_size,
                         train=train)
    return Landscape(loss, acc, (a,))


def plane(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    d1: Mapping[str, Tensor],
    d2: Mapping[str, Tensor],
    alphas: Tensor | Sequence[float],
    betas: Tensor | Sequence[float],
    *,
    chunk_size: int | None = None,
    train: bool = False,
) -> Landscape:
    """Loss and accuracy on the grid ``w + a d1 + b d2``: arrays of shape ``(len(a), len(b))``."""
    a, b = _coords_1d(alphas, "alphas"), _coords_1d(betas, "betas")
    ga, gb = torch.meshgrid(a, b, indexing="ij")
    coords = torch.stack([ga.reshape(-1), gb.reshape(-1)], dim=1)
    loss, acc = evaluate(model, loss_fn, data, [d1, d2], coords, chunk_size=chunk_size,
                         train=train)
    shape = (a.numel(), b.numel())
    return Landscape(loss.reshape(shape), acc.reshape(shape), (a, b))


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    alphas: Tensor | Sequence[float] = tuple(i / 20 for i in range(-5, 26)),
    *,
    buffers: bool = True,
    chunk_size: int | None = None,
    train: bool = False,
) -> Landscape:
    """Loss and accuracy at ``(1 - a) w_a + a w_b`` (Goodfellow et al. 2015; Li et al. Fig. 2).

    ``a = 0`` is ``model_a``, ``a = 1`` is ``model_b``; values outside [0, 1] extrapolate.
    With ``buffers=True`` floating-point buffers (BatchNorm running statistics) are interpolated
    too; otherwise ``model_a``'s are used throughout. The two models must share an architecture.
    """
    a = _coords_1d(alphas, "alphas")
    state_a = dict(model_a.named_parameters()) | (
        {n: b for n, b in model_a.named_buffers() if b.is_floating_point()} if buffers else {})
    state_b = dict(model_b.named_parameters()) | dict(model_b.named_buffers())
    direction = {}
    for n, t in state_a.items():
        if n not in state_b or state_b[n].shape != t.shape:
            raise ValueError(f"models differ at {n!r}: they must share an architecture")
        direction[n] = (state_b[n].detach() - t.detach()).to(t.dtype)
    loss, acc = evaluate(model_a, loss_fn, data, [direction], a[:, None], chunk_size=chunk_size,
                         train=train)
    return Landscape(loss, acc, (a,))
