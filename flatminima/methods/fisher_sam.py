"""Fisher SAM, Kim, Li, Hu & Hospedales, ICML 2022: SAM's ball replaced by a Fisher ellipsoid."""

from __future__ import annotations

import math

from torch import Tensor, nn

from flatminima._checks import check_nonneg
from flatminima.methods._hparams import hparam
from flatminima.methods._registry import register_method
from flatminima.methods.sam import SAM


@register_method("fisher_sam")
class FisherSAM(SAM):
    """``grad L(w + e)``, ``e = rho f^-1 g / sqrt(g^T f^-1 g)``, ``f = 1 + eta g^2`` (Kim et al.).

    Kim, Li, Hu, Hospedales, "Fisher SAM: Information Geometry and Sharpness Aware
    Minimisation" (ICML 2022, PMLR 162:11148-11161). SAM maximizes the first-order loss over a
    Euclidean ball; Fisher SAM over the ellipsoid ``e^T F e <= rho^2`` of the Fisher metric, whose
    maximizer is ``rho * F^-1 g / sqrt(g^T F^-1 g)``. The Fisher is approximated, as in the
    paper, by a diagonal from the batch's own gradient, regularized by the identity::

        g = grad L(w)                        # this batch, all micro-batches
        f = 1 + eta * g * g                  # elementwise: the diagonal of F
        e = rho * (g / f) / sqrt(sum g * g / f)
        grad = grad L(w + e)

    so coordinates whose gradient is large (high information) move less. ``eta = 0`` is SAM
    with radius ``rho`` exactly. It is SAM with another ascent (SAM's sweeps, overflow handling
    and ``m=`` m-sharpness, each group's ellipsoid from its own gradient). Cost: SAM's two
    passes. ``rho`` is the paper's ``gamma``; defaults ``rho=0.1, eta=1.0`` are the paper's CIFAR
    setting as we read it.

    We found no official code release; the formula is the paper's, checked against public
    re-implementations (which agree on ``f = 1 + eta g^2`` and the ``sqrt(g^T f^-1 g)``
    normalization).

    Example::

        method = fm.FisherSAM(rho=0.1, eta=1.0)
    """

    rho = hparam(0.1, check_nonneg, "radius of the Fisher ellipsoid (paper's gamma), >= 0.")
    eta = hparam(1.0, check_nonneg, "weight of the squared gradient in the diagonal Fisher, >= 0.")

    def _ascent(
        self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        eta = float(self.eta)
        u = {n: g / (1.0 + eta * g * g) for n, g in grads.items()}  # f^-1 g
        quad = math.sqrt(float(sum((grads[n].double() * u[n].double()).sum() for n in grads)))
        scale = float(self.rho) / (quad + 1e-12)
        return {n: t * scale for n, t in u.items()}
