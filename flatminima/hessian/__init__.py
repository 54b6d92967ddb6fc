"""Curvature of the loss: Hessian-vector products, top eigenvalues, trace and spectral density.

* :func:`hvp` - Hessian (or Gauss-Newton) times a vector.
* :func:`eigenvalues` - the top-``k`` eigenvalues by Lanczos with a residual-based stopping rule.
* :func:`trace` - Krylov-deflated Hutchinson (``method="krylov"``, the default), Hutch++ or
  Hutchinson, with a standard error.
* :func:`density` / :func:`density_nodes` - spectral density by stochastic Lanczos quadrature.
* :class:`CurvatureOperator` - the operator itself, for custom algorithms.

Everything is for the size-weighted mean loss over ``data`` (one ``(x, y)`` batch or an
iterable of batches), over all trainable parameters or a subset (``params="last_layer"``, a list
of names, a predicate), in eval mode unless ``train=True``. Random starts take ``generator``.
"""

from flatminima.hessian._density import density, density_nodes, smooth_density
from flatminima.hessian._eigen import eigenvalues
from flatminima.hessian._lanczos import LanczosResult, lanczos
from flatminima.hessian._operator import CURVATURES, MODES, CurvatureOperator, hvp
from flatminima.hessian._trace import TRACE_METHODS, TraceEstimate, trace

__all__ = [
    "CURVATURES",
    "MODES",
    "TRACE_METHODS",
    "CurvatureOperator",
    "LanczosResult",
    "TraceEstimate",
    "density",
    "density_nodes",
    "eigenvalues",
    "hvp",
    "lanczos",
    "smooth_density",
    "trace",
]
