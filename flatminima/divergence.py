"""Model divergence: the NRS paper's flatness measure ``E_u KL(f_w || f_{w+u})``.

Zhao & Zhang, "Neighborhood Region Smoothing Regularization for Finding Flat Minima in Deep
Neural Networks" (2022), Sec. 3.1, define the model divergence between weights ``w`` and ``w'``
as the KL divergence of the predicted class distributions averaged over the inputs,

    D(w, w') = E_x KL( softmax f_w(x) || softmax f_{w'}(x) ),

and argue that a flat minimum has a low divergence to every model in its neighbourhood
``w + u``. This module estimates

    E_u D(w, w + u)  ~=  (1/S) sum_s sum_b (n_b / N) * mean_{x in B_b} KL(p_w(x) || p_{w+u_s}(x)),

with ``u_s`` drawn by the same samplers the training methods use (:mod:`flatminima.noise`;
default as :class:`flatminima.NRS`: uniform in a per-filter ball of radius ``rho * ||w_filter||``),
so the number measures exactly the neighbourhood NRS regularizes. The perturbed models are
evaluated as landscape points are (:class:`flatminima.landscape.PointEvaluator`): many per
``torch.func.vmap``-ed pass where that is faster, a chunk of them held at a time.

:func:`kl_divergence`, the divergence of one batch (NRS's training term too), lives in
:mod:`flatminima._kl` below both and is re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flatminima import noise as noise_lib
from flatminima._checks import check_callable, check_optional_positive_int, check_positive_int
from flatminima._kl import kl_divergence as kl_divergence  # public: fm.divergence.kl_divergence
from flatminima._nn import model_device
from flatminima._params import ParamSpec, as_batches, measuring_mode, select_params
from flatminima.landscape import PointEvaluator


def _kl_rows(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    # Measurements are reported in float64 whatever the model's dtype.
    return kl_divergence(logits_p.double(), logits_q.double())


def model_divergence(
    model: nn.Module,
    data: object,
    rho: float,
    num_samples: int = 10,
    *,
    noise: noise_lib.NoiseFn | None = None,
    distribution: str = "ball",
    scale: str = "filter",
    relative: bool = True,
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    train: bool = False,
) -> float:
    """Mean model divergence ``E_u KL(f_w || f_{w+u})`` over ``num_samples`` perturbations.

    ``noise`` is a sampler ``(params, generator) -> {name: u}`` (any of :mod:`flatminima.noise`
    or a method's ``noise=``); without it ``fm.noise.Sampler(rho, distribution, scale,
    relative)`` is used, the NRS/RPR default. ``data`` is one ``(x, y)`` batch or an iterable of
    batches (targets are ignored; the mean over batches is size-weighted). ``params`` restricts
    the perturbed parameters. ``chunk_size`` perturbed models share one vmapped pass; by default
    the faster of vmapped passes and one pass per sample, timed on the first samples (see
    :func:`flatminima.landscape.evaluate`). Eval mode unless ``train=True`` (then one sample at
    a time, buffers restored; dropout then draws a fresh mask for the clean pass and for each
    perturbed one, so the result includes dropout's own divergence and is not 0 at ``rho=0``).
    Samples are drawn in order from ``generator``.

    Example::

        d = fm.divergence.model_divergence(model, test_batches, rho=0.05, num_samples=20,
                                           generator=torch.Generator().manual_seed(0))
    """
    rho = noise_lib.check_radius(rho, "rho")
    num_samples = check_positive_int(num_samples, "num_samples")
    chunk_size = check_optional_positive_int(chunk_size, "chunk_size")
    if noise is None:
        noise = noise_lib.Sampler(rho, distribution=distribution, scale=scale, relative=relative)
    else:
        check_callable(noise, "noise")
    batches = as_batches(data, model_device(model))
    # The example input finds the last layer in execution order (a head registered first).
    selected = {n: p.detach()
                for n, p in select_params(model, params, batches[0][0]).items()}
    with measuring_mode(model, train), torch.no_grad():
        clean = [(x, model(x)) for x, _y in batches]
    # The "loss" of a perturbed model on a batch is its divergence from the clean outputs,
    # which stand in for the targets; the evaluator weights batches by size.
    ev = PointEvaluator(model, lambda out, logits: _kl_rows(logits, out), clean, list(selected),
                        chunk_size=chunk_size, train=train)
    drawn = 0

    def perturbed(start: int, stop: int) -> Tensor:
        """Weight sets ``w + u_s`` for samples ``start..stop-1``, drawn in order on demand, so
        that only one chunk of them is ever held."""
        nonlocal drawn
        assert start == drawn, "samples are drawn in order"
        us = []
        for _ in range(start, stop):
            u = noise(dict(selected), generator)
            noise_lib.check_noise_output(u, selected, noise)
            us.append(ev.flat.flatten({n: t.to(ev.w0) for n, t in u.items()}))
        drawn = stop
        return ev.w0 + torch.stack(us)

    kls, _ = ev.run(perturbed, num_samples)
    return float(kls.mean())
