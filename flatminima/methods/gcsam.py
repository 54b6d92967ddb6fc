"""Gradient-centralized SAM (GCSAM), Hassan et al. 2025."""

from __future__ import annotations

from torch import Tensor, nn

from flatminima.methods._registry import register_method
from flatminima.methods.sam import SAM


def centralize(t: Tensor) -> Tensor:
    """Gradient centralization: ``t`` minus its mean over all dimensions but the first (each
    output unit's or filter's mean), for a tensor with more than one dimension."""
    return t - t.mean(dim=tuple(range(1, t.dim())), keepdim=True) if t.dim() > 1 else t


@register_method("gcsam")
class GCSAM(SAM):
    """``grad L(w + e)``, ``e = rho * GC(g) / ||g||``: SAM with a gradient-centralized ascent.

    Hassan, Vakanski, Zhang, Xian, "GCSAM: Gradient Centralized Sharpness Aware Minimization"
    (arXiv 2501.11584, 2025); official code https://github.com/mhassann22/GCSAM, and
    ``SAM(use_gc=True)`` in pytorch_optimizer. ``GC(g)`` subtracts, from each gradient tensor
    with more than one dimension, its mean over all dimensions but the first (Yong et al.'s
    gradient centralization); biases and norm scales are left as they are. Only the ascent is
    centralized; the gradient at ``w + e`` is accumulated as it is.

    The norm is that of the raw gradient, taken before centralizing, as both codes do (so
    ``||e|| <= rho``); the paper writes ``rho * GC(g) / ||GC(g)||``.

    Example::

        method = fm.create_method("gcsam", rho=0.05)
    """

    def _ascent(
        self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        # GC is linear, so centralizing SAM's rho * g / ||g|| is rho * GC(g) / ||g||.
        return {n: centralize(v) for n, v in super()._ascent(params, grads).items()}
