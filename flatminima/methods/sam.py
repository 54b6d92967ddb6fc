"""Sharpness-aware minimization: SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021).

The sweeps here are the whole SAM family's: GSAM, WSAM, GCSAM and FriendlySAM (each in its own
file) subclass :class:`SAM` and change one hook: the clean gradient they read
(``_gradient_params``), the ascent they take from it (``_ascent``), the gradient they accumulate
at ``w + e`` (``_descend``) or the state they keep (``_observe``). m-sharpness (``m=``) lives
here too, so every member of the family has it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flatminima._checks import check_nonneg, check_optional_positive_int
from flatminima.methods._base import Method, poison_grads
from flatminima.methods._gradients import global_norm
from flatminima.methods._hparams import hparam, option
from flatminima.methods._passes import MicroBatch, Passes, StepResult, batch_size
from flatminima.methods._registry import register_method

Grads = dict[str, Tensor]


def clean_gradient(
    unit: Sequence[MicroBatch], params: Mapping[str, nn.Parameter], frozen: bool = False
) -> Grads:
    """Sweep 1 over ``unit``: ``sum_m (n_m / N) grad L_m(w)`` of ``params``, read back without
    touching ``p.grad`` (unscaled; zero where a parameter is unused).

    ``frozen``: these clean passes leave the normalization statistics alone (the groups of
    m-sharpness, whose micro-batches already updated them once)."""
    names, tensors = list(params), list(params.values())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for mb in unit:
        clean = mb.forward(stats=False) if frozen else mb.forward()
        for n, g in zip(names, mb.gradient(clean.loss, tensors), strict=True):
            if g is not None:
                grads[n] += g
    return grads


def add_to_grad(step: Passes, params: Mapping[str, nn.Parameter], values: Mapping[str, Tensor]
                ) -> None:
    """``p.grad += values[name]``, scaled as every backward of ``step`` is, for a term known in
    closed form (WSAM's and GSAM's share of the clean gradient).

    Written before the call's final backward: under DDP that backward all-reduces the whole of
    ``p.grad`` (what the ``no_sync`` passes accumulated, and this), so the term is averaged once.
    """
    scale = float(step.scaler.get_scale()) if step.scaler is not None else None
    for n, p in params.items():
        v = values[n].detach() if scale is None else values[n].detach() * scale
        if p.grad is None:
            p.grad = v.clone()
        else:
            p.grad.add_(v)


def _rows(x: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch: a tensor, or a list, tuple or dict of tensors."""
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, Mapping):
        return {k: _rows(v, start, stop) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)([_rows(v, start, stop) for v in x])
    raise ValueError(f"m-sharpness cannot split a batch of type {type(x).__name__} into groups")


def sharpness_groups(step: Passes, m: int) -> tuple[Passes, list[list[MicroBatch]]] | None:
    """m-sharpness: the batch as consecutive groups of ``m`` examples, the last one smaller if
    ``m`` does not divide it; ``None`` when one group holds the whole batch.

    The groups are those of the full batch, whatever the micro-batches: a group that spans two
    micro-batches runs as two pieces sharing its ascent. Returns the passes over all pieces
    (each weighted ``n_piece / N``) and, for each group, its pieces.
    """
    sizes = [batch_size(mb.inputs) for mb in step]
    if m >= sum(sizes):
        return None
    xs, ys, group_of = [], [], []
    offset = 0  # index in the whole batch of the micro-batch's first example
    for mb, n in zip(step, sizes, strict=True):
        start = 0
        while start < n:
            k = (offset + start) // m
            stop = min(n, (k + 1) * m - offset)
            xs.append(_rows(mb.inputs, start, stop))
            ys.append(_rows(mb.targets, start, stop))
            group_of.append(k)
            start = stop
        offset += n
    pieces = Passes(step.model, xs, ys, step.loss_fn, step.scaler)
    groups: list[list[MicroBatch]] = [[] for _ in range(group_of[-1] + 1)]
    for piece, k in zip(pieces, group_of, strict=True):
        groups[k].append(piece)
    return pieces, groups


@register_method("sam")
class SAM(Method):
    """``grad L(w + e)``, ``e = rho * g / ||g||``, ``g = grad L(w)`` (Foret et al., ICLR 2021).

    The ascent direction ``g`` comes from the full batch (all micro-batches), unscaled when a
    ``GradScaler`` is used; the second pass at ``w + e`` accumulates into ``p.grad``. The first
    pass updates the BatchNorm statistics, the second does not. Parameters outside ``params``
    are not perturbed but still receive their gradient at ``w + e``. A non-finite ascent
    (float16 overflow) makes ``scaler.step`` skip the step.

    **m-sharpness** (``m=``; paper Sec. 4.1, ``inner_group_size`` of google-research/sam, where a
    group is the batch of one accelerator): the batch is cut into consecutive groups of ``m``
    examples (the last one smaller when ``m`` does not divide it), each group ``k`` takes its own
    ascent ``e_k`` from its own gradient, and the accumulated gradient is
    ``sum_k (n_k / N) grad L_k(w + e_k)``. The groups are those of the full batch whatever the
    micro-batches (a group across two micro-batches runs as two pieces sharing its ascent), so
    micro-batches still give the full-batch gradient. Each micro-batch's clean pass without a
    graph updates the BatchNorm statistics once (and gives the clean loss and logits); the
    groups' passes normalize with their own batch statistics, as one accelerator's batch does
    (so with BatchNorm a group needs at least 2 examples). This costs one such pass per
    micro-batch beyond ``2`` passes over the batch; ``m=None`` (or ``m >= N``) is plain SAM.

    Example::

        method = fm.SAM(rho=0.05)
        method.backward(model, x, y); opt.step(); opt.zero_grad()
    """

    rho = hparam(0.05, check_nonneg, "ascent radius, >= 0 (paper: 0.05 on CIFAR).")
    m = option(None, check_optional_positive_int,
               "m-sharpness: one ascent per group of m examples, >= 1 (None: the whole batch).",
               type=int | None)

    # Whether ``_observe`` needs the full-batch clean gradient (summed over the groups).
    _observes_gradient: ClassVar[bool] = False

    # -- the hooks of the family ------------------------------------------------------------

    def _ascent(
        self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        scale = float(self.rho) / (global_norm(grads) + 1e-12)
        return {n: g * scale for n, g in grads.items()}

    def _gradient_params(
        self, step: Passes, params: dict[str, nn.Parameter]
    ) -> dict[str, nn.Parameter]:
        """The parameters whose clean gradient sweep 1 reads (SAM: the perturbed ones)."""
        return params

    def _descend(
        self, unit: list[MicroBatch], e: Grads, g: Grads, weight: float,
        params: dict[str, nn.Parameter],
    ) -> bool:
        """Sweep 2 over ``unit`` (one ascent's micro-batches, total weight ``weight``; ``g`` is
        their mean clean gradient of ``params``): accumulate the method's gradient at ``w + e``.
        Returns False when a value the step needs is not finite (the step is then skipped)."""
        for mb in unit:
            mb.backward(mb.forward(e, final=True).loss)
        return True

    def _observe(self, g: Grads) -> None:
        """The call's full-batch clean gradient of the perturbed parameters (when finite), for a
        method with state; SAM keeps none."""

    # -- the sweeps --------------------------------------------------------------------------

    def _backward(self, step: Passes, generator) -> StepResult:
        params = self.selected_params(step)
        grouped = sharpness_groups(step, self.m) if self.m is not None else None
        if grouped is None:
            self._sweeps(step, [list(step)], [1.0], params)
            return step.result()
        pieces, groups = grouped
        for mb in step:  # the statistics, clean loss and logits, once per micro-batch
            mb.forward(grad=False)
        self._sweeps(pieces, groups, [sum(p.weight for p in g) for g in groups], params,
                     frozen=True)
        clean = step.result()
        return StepResult(clean.loss, clean.logits, pieces.result().perturbed_loss)

    def _sweeps(
        self, step: Passes, units: list[list[MicroBatch]], weights: list[float],
        params: dict[str, nn.Parameter], frozen: bool = False,
    ) -> None:
        """For each unit (the whole batch, or one group): its clean gradient, its ascent, and
        the second sweep at ``w + e``; then the step is poisoned if anything was not finite."""
        read = self._gradient_params(step, params)
        finite, total = True, None
        for unit, weight in zip(units, weights, strict=True):
            g = clean_gradient(unit, read, frozen)
            if weight != 1.0:  # a group's own mean gradient (its ascent and GSAM need it)
                g = {n: t / weight for n, t in g.items()}
            ok = all(bool(torch.isfinite(t).all()) for t in g.values())
            # A non-finite ascent: skip the step (below) rather than step on garbage; the second
            # sweep still runs (at w, as plain SAM) so that DDP reduces and every rank agrees.
            if ok:
                e = self._ascent(params, {n: g[n] for n in params})
                ok = self._descend(unit, e, g, weight, read)
            else:
                SAM._descend(self, unit, {n: torch.zeros_like(p) for n, p in params.items()},
                             g, weight, read)
            finite = finite and ok
            if self._observes_gradient:
                part = {n: g[n] * weight if weight != 1.0 else g[n] for n in params}
                total = part if total is None else {n: total[n] + part[n] for n in total}
            del g
        if not finite:
            poison_grads(list(params.values()))
        elif total is not None:
            self._observe(total)


@register_method("asam")
class ASAM(SAM):
    """Adaptive SAM: ``e = rho * T_w^2 g / ||T_w g||``, ``T_w = |w| + eta`` (Kwon et al. 2021).

    As in the authors' code, the operator ``T_w`` acts on parameters whose name contains
    ``"weight"`` (so biases are excluded, normalization scales included); every other parameter
    has ``T = 1``. ASAM's ``rho`` is about 10x SAM's (paper: 0.5 with SGD on CIFAR-10).

    Example::

        method = fm.ASAM(rho=0.5, eta=0.01)
    """

    rho = hparam(0.5, check_nonneg, "ascent radius in the rescaled space, >= 0.")
    eta = hparam(0.01, check_nonneg, "keeps T_w away from zero, >= 0 (paper: 0.01).")

    def _ascent(
        self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        t = {
            n: (p.detach().abs() + float(self.eta)) if "weight" in n else None
            for n, p in params.items()
        }
        tg = {n: g * t[n] if t[n] is not None else g for n, g in grads.items()}
        scale = float(self.rho) / (global_norm(tg) + 1e-12)
        return {n: (v * t[n] if t[n] is not None else v) * scale for n, v in tg.items()}
