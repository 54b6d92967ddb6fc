"""Efficient SAM (ESAM), Du et al., ICLR 2022: stochastic weight perturbation and
sharpness-sensitive data selection."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flatminima._checks import check_nonneg, check_unit_interval
from flatminima._nn import ModelLoss
from flatminima.methods._base import Method, poison_grads
from flatminima.methods._gradients import (
    all_finite,
    concat_rows,
    global_norm,
    per_example_losses,
    take_rows,
)
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import MicroBatch, Passes, StepResult, batch_size
from flatminima.methods._registry import register_method


def _check_fraction(value, name: str) -> float:
    number = check_unit_interval(value, name)
    if number == 0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return number


@register_method("esam")
class ESAM(Method):
    """SAM on a random subset of the weights and the examples whose loss rose most (Du et al.).

    Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for Improved
    Training of Neural Networks" (ICLR 2022); official code
    https://github.com/dydjw9/Efficient_SAM (``utils/Esam.py``). As there:

    * **Stochastic weight perturbation.** Each parameter tensor is kept with probability
      ``beta`` (one draw per tensor and call from ``generator``); only the kept ones get a
      clean gradient (the saving) and are perturbed, scaled by ``1/beta``::

          g = grad L(w) over the kept tensors K
          e_K = (rho / beta) * g_K / ||g_K||,   e = 0 elsewhere

      (the official code drops a tensor by turning its ``requires_grad`` off for the next step's
      first backward, so its gradient, and its share of the norm, are zero).
    * **Sharpness-sensitive data selection.** With the per-example losses ``l_i`` of the clean
      pass and ``l_i(w + e)`` of a pass without a graph, the second pass uses only the
      ``k = max(1, floor(gamma * N))`` examples of largest ``l_i(w + e) - l_i(w)``::

          grad = grad (1/k) sum_{i in top-k} l_i(w + e)

      The selection is over the whole batch, whatever the micro-batches (it then runs in
      chunks of about equal size no larger than the largest micro-batch). ``gamma = 1`` uses
      every example and skips the pass without a graph.

    Departures: the official code keeps the examples whose sharpness is strictly above the k-th
    largest (one fewer than ``k``, fewer on ties) and uses every example once ``gamma >= 0.99``;
    here exactly the top ``k``, ties broken by ``torch.topk``. The mask is drawn at the start
    of the call (the official code draws it at the end of the previous step: same
    distribution, no state between calls). Under DDP each rank draws its own mask and selects
    from its own batch, as there.

    ``loss_fn`` is applied to one example at a time for the per-example losses (vmapped where
    it allows; it must return the batch mean, as everywhere here). The passes at ``w + e``,
    including the one on the selected examples (whose batch statistics are those of the
    selection, as the official code's), leave the BatchNorm statistics alone. The result's
    ``perturbed_loss`` is the mean loss at ``w + e`` of the selected examples.

    Defaults: ``rho=0.05`` and ``beta=0.6, gamma=0.5`` of the official ``run.sh`` for ResNet-18
    on CIFAR (its wide-ResNet lines use ``rho=0.1, beta=0.5``); ``beta = gamma = 1`` is SAM.

    Example::

        method = fm.ESAM(rho=0.05, beta=0.6, gamma=0.5)
        method.backward(model, x, y, generator=torch.Generator().manual_seed(0))
    """

    rho = hparam(0.05, check_nonneg, "ascent radius, >= 0 (official run.sh: 0.05-0.2).")
    beta = hparam(0.6, _check_fraction,
                  "probability that a parameter tensor is perturbed, in (0, 1].")
    gamma = hparam(0.5, _check_fraction,
                   "fraction of the examples used by the second pass, in (0, 1].")

    def _backward(self, step: Passes, generator: torch.Generator | None) -> StepResult:
        params = self.selected_params(step)
        beta, gamma = float(self.beta), float(self.gamma)
        if gamma < 1.0 and isinstance(step.loss_fn, ModelLoss):
            # Checked before any pass, so that p.grad is untouched when it is refused.
            raise TypeError("ESAM selects examples by their own losses, loss_fn(outputs, "
                            "targets) with per-example losses, which a ModelLoss (a framework's "
                            "own loss, a closure) cannot give: pass a plain loss_fn, or gamma=1")
        names = list(params)
        if beta < 1.0:
            # On the generator's device (a CUDA generator cannot draw on the CPU).
            device = generator.device if generator is not None else None
            draw = torch.rand(len(names), generator=generator, device=device)
            kept = [n for n, r in zip(names, draw.tolist(), strict=True) if r < beta]
        else:
            kept = names
        tensors = [params[n] for n in kept]
        g = {n: torch.zeros_like(params[n]) for n in kept}
        for mb in step:  # sweep 1: the clean gradient of the kept tensors only
            clean = mb.forward(grad=bool(kept))
            if kept:
                for n, t in zip(kept, mb.gradient(clean.loss, tensors), strict=True):
                    if t is not None:
                        g[n] += t
        finite = all_finite(g)
        scale = float(self.rho) / beta / (global_norm(g) + 1e-12) if finite else 0.0
        e = {n: g[n] * scale for n in kept}
        del g
        if not e:  # nothing kept: the passes still run at w + 0 (statistics left alone)
            first = names[0]
            e = {first: torch.zeros_like(params[first])}
        if gamma >= 1.0:
            for mb in step:
                mb.backward(mb.forward(e, final=True).loss)
            result = step.result()
        else:
            result = self._selected_descent(step, e, gamma)
        if not finite:
            poison_grads(list(params.values()))
        return result

    def _selected_descent(self, step: Passes, e: dict[str, Tensor], gamma: float) -> StepResult:
        """The second pass on the top ``gamma`` fraction of examples by loss increase."""
        sharpness = []
        for mb in step:
            assert mb.clean is not None
            before = per_example_losses(step.loss_fn, mb.clean.outputs, mb.targets)
            out = mb.forward(e, grad=False, loss_weight=0.0).outputs
            after = per_example_losses(step.loss_fn, out, mb.targets)
            sharpness.append((after - before).detach().float().cpu())
        sizes = [batch_size(mb.inputs) for mb in step]
        k = max(1, int(sum(sizes) * gamma))
        top = torch.sort(torch.topk(torch.cat(sharpness), k).indices).values
        starts = torch.tensor([0, *sizes]).cumsum(0)
        # The selection runs in chunks no larger than the largest micro-batch (the memory the
        # caller allowed), each chunk a micro-batch weighted n_chunk / k so that the sum is the
        # mean over the selection. Chunks of about equal size, whatever micro-batch their
        # examples came from, so that none is a lone example (BatchNorm cannot normalize one).
        # The last chunk takes the index of the call's last micro-batch: its final pass is the
        # one DDP synchronizes on.
        chunks = torch.tensor_split(top, math.ceil(k / max(sizes)))
        losses, weights = [], []
        for j, rows in enumerate(chunks):
            pieces = []
            for mb, lo, hi in zip(step, starts[:-1].tolist(), starts[1:].tolist(), strict=True):
                mine = rows[(rows >= lo) & (rows < hi)] - lo
                if len(mine):
                    pieces.append((take_rows(mb.inputs, mine), take_rows(mb.targets, mine)))
            index = len(step) - 1 if j == len(chunks) - 1 else j
            sub = MicroBatch(step, index, concat_rows([x for x, _ in pieces]),
                             concat_rows([y for _, y in pieces]), len(rows) / k)
            p = sub.forward(e, final=True)
            sub.backward(p.loss)
            losses.append(p.loss.detach())
            weights.append(sub.weight)
        clean = step.result()
        perturbed = torch.stack([v * w for v, w in zip(losses, weights, strict=True)]).sum()
        return StepResult(clean.loss, clean.logits, perturbed)
