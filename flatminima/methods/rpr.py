"""Random perturbation (RPR): the gradient of the loss at a random point of the neighbourhood."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from flatminima import noise as noise_lib
from flatminima.methods._base import Method, StepResult, check_nonneg, weighted_passes


class RandomPerturbationMixin:
    """The neighbourhood sampler shared by RPR and NRS.

    ``u`` is drawn by ``noise`` when given (a callable ``(params, generator) -> dict``), else by
    ``fm.noise.sample(params, rho, distribution, scale, relative)``, re-read from the attributes on
    every call so that ``rho`` can be scheduled.
    """

    rho: float
    distribution: str
    scale: str
    relative: bool
    noise: Callable[..., dict[str, Tensor]] | None

    def _init_noise(
        self,
        rho: float,
        noise: Callable[..., dict[str, Tensor]] | None,
        distribution: str,
        scale: str,
        relative: bool,
    ) -> None:
        self.rho = rho
        self.noise = noise
        self.distribution = distribution
        self.scale = scale
        self.relative = relative

    def _noise_fn(self) -> Callable[..., dict[str, Tensor]]:
        if self.noise is not None:
            return self.noise
        return noise_lib.Sampler(self.rho, self.distribution, self.scale, self.relative)

    def _validate_noise(self) -> None:
        check_nonneg(self.rho, "rho")
        if self.noise is None:
            # Building the sampler checks distribution and scale names.
            noise_lib.Sampler(self.rho, self.distribution, self.scale, self.relative)
        elif not callable(self.noise):
            raise ValueError(f"noise must be callable, got {self.noise!r}")


class RPR(RandomPerturbationMixin, Method):
    """``grad L(w + u)``, ``u`` random in the neighbourhood of radius ``rho`` (NRS paper's RPR).

    The control of Zhao & Zhang (2022), Sec. 4: the same random perturbation as NRS but without the
    divergence and the clean loss. By default ``u`` is uniform in the ball of radius
    ``rho * ||w_filter||`` for every filter (see ``fm.noise``). The clean loss reported in the
    result comes from a forward pass without a graph, which also updates the BatchNorm statistics.

    Args:
        rho: neighbourhood radius (relative to the weights by default), ``>= 0``.
        noise: optional sampler ``(params, generator) -> dict``; overrides the next three.
        distribution, scale, relative: the default sampler's choices (``fm.noise``).
        params: which parameters are perturbed (``None``: all trainable).
        share_noise: under DDP, use rank 0's perturbation on every rank.
    """

    name = "rpr"
    _hparam_names = ("rho", "distribution", "scale", "relative")

    def __init__(
        self,
        rho: float = 0.05,
        *,
        noise: Callable[..., dict[str, Tensor]] | None = None,
        distribution: str = "ball",
        scale: str = "filter",
        relative: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self._init_noise(rho, noise, distribution, scale, relative)
        self._validate()

    def _validate(self) -> None:
        self._validate_noise()

    def _backward(self, model, micro, weights, loss_fn, scaler, generator) -> StepResult:
        params = self._perturbed_params(model)
        u = self._draw(self._noise_fn(), params, generator)
        return weighted_passes(model, micro, weights, loss_fn, scaler, [(0.0, None), (1.0, u)])
