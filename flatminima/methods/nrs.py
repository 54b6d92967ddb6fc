"""Neighborhood Region Smoothing (NRS), Zhao & Zhang 2022.

Objective (paper Eq. 3), for a random ``u`` in the neighbourhood of radius ``rho``::

    L_NRS(w) = L(w) + alpha * KL(f_w(x) || f_{w+u}(x)) + L(w + u)

with ``f`` the predicted class distribution (softmax of the outputs). ``u`` is a constant of the
step; the gradient flows through both branches, ``f_w`` and ``f_{w+u}``.
"""

from __future__ import annotations

from torch import Tensor

from flatminima._checks import check_bool, check_nonneg
from flatminima._kl import kl_divergence
from flatminima.methods._hparams import hparam
from flatminima.methods._neighbourhood import Neighbourhood
from flatminima.methods._passes import Passes, StepResult
from flatminima.methods._registry import register_method


def check_logits(outputs: Tensor) -> None:
    """NRS's divergence compares class distributions: refuse outputs that are not logits over
    classes in the last dimension (one output has a KL of 0 to every other: silently no term)."""
    if outputs.dim() == 0 or outputs.shape[-1] < 2:
        raise ValueError(
            f"NRS needs logits over at least 2 classes in the last dimension (its divergence is "
            f"a KL of softmax distributions); the model returned shape {tuple(outputs.shape)}"
        )


@register_method("nrs")
class NRS(Neighbourhood):
    """Neighborhood Region Smoothing: ``grad [L(w) + alpha*KL(f_w || f_{w+u}) + L(w+u)]``.

    Zhao & Zhang, "Neighborhood Region Smoothing Regularization for Finding Flat Minima in Deep
    Neural Networks", 2022. One ``u`` per call (per device under DDP: the paper's practical
    scheme), shared by all micro-batches.

    The model's outputs must be **logits** over classes in the last dimension: the divergence is
    ``KL(softmax f_w || softmax f_{w+u})``. A single output is a ``ValueError``; outputs that
    are already probabilities (a softmax head) are not detected and give a wrong, much smaller
    divergence: return the logits.

    The paper samples ``u`` in the ball ``B(0, rho)`` and then "normalizes u using w" (Algorithm
    1, step 8), without a formula in the text we have. Our default reads that as: ``u`` uniform
    in a ball per filter whose radius is ``rho * ||w_filter||`` (``distribution="ball",
    scale="filter", relative=True``), which is invariant to the per-filter rescaling that
    BatchNorm makes free and matches the filter-wise normalization of the flatness literature
    (Li et al. 2018; Kwon et al. 2021). ``scale="global"`` gives a single ball of radius
    ``rho * ||w||``, ``relative=False`` the literal ``B(0, rho)``. The objective sums two
    cross-entropies, so at equal learning rate its gradient is about twice Baseline's: compare at
    tuned learning rates, with the ``alpha=0`` and ``rho=0`` controls (README, "Traps").

    ``low_memory=True`` never holds two autograd graphs at once. The KL gradient splits exactly
    into a part through ``f_w`` (with ``f_{w+u}`` held constant) and a part through ``f_{w+u}``,
    so the branches are backpropagated one after the other; one extra forward pass without a
    graph gives the perturbed outputs the first branch needs. Same gradient.

    Example::

        method = fm.NRS(rho=0.05, alpha=1.0)
        result = method.backward(model, x, y)   # result.divergence is the KL term
        opt.step(); opt.zero_grad(set_to_none=True)
    """

    alpha = hparam(1.0, check_nonneg, "weight of the model divergence, >= 0 (paper: 1.0).")
    low_memory = hparam(False, check_bool,
                        "backpropagate the two branches one after the other (one more forward "
                        "pass, one graph alive at a time); same gradient.", positional=False)

    def _backward(self, step: Passes, generator) -> StepResult:
        u = self.draw(step, generator)
        alpha = float(self.alpha)
        divergences = []
        for mb in step:
            if self.low_memory:
                # 1. perturbed outputs without a graph: the constant the clean branch's KL needs.
                z2_const = mb.forward(u, grad=False, loss_weight=0.0).outputs
                # 2. clean branch: L(w) + alpha * KL(f_w || const), backward, graph freed.
                clean = mb.forward()
                check_logits(clean.outputs)
                kl = kl_divergence(clean.outputs, z2_const)
                mb.backward(clean.loss + alpha * kl)
                # 3. perturbed branch: alpha * KL(const || f_{w+u}) + L(w+u), backward.
                pert = mb.forward(u, final=True)
                mb.backward(alpha * kl_divergence(clean.outputs.detach(), pert.outputs)
                            + pert.loss)
            else:
                # One graph through both branches: the clean forward, then the perturbed one,
                # the last before the single backward (the one DDP synchronizes on).
                clean = mb.forward()
                check_logits(clean.outputs)
                pert = mb.forward(u, final=True)
                kl = kl_divergence(clean.outputs, pert.outputs)
                mb.backward(clean.loss + alpha * kl + pert.loss)
            divergences.append(kl.detach())
        return step.result(divergence=divergences)
