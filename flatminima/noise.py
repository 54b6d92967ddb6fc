"""Perturbation samplers: a distribution times a scale rule.

Every random-perturbation method (RPR, NRS, NSO, SmoothOut, AdaSmoothOut, RWP) and the model
divergence measurement draw their weight perturbation ``u`` from here. A sampler is any callable

    noise(params: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Tensor]

returning one tensor per named parameter, of the same shape, dtype and device. Users inject
their own.

The built-in samplers compose two choices (optax style: small pieces that compose):

* **distribution** of the unit draw ``xi_G`` for each group ``G`` of entries:

  - ``"gaussian"``: ``xi ~ N(0, I)`` entrywise (its norm grows like ``sqrt(|G|)``);
  - ``"uniform"``: ``xi ~ U(-1, 1)`` entrywise;
  - ``"sphere"``: ``xi`` uniform on the unit sphere of the group, ``||xi_G|| = 1``;
  - ``"ball"``: ``xi`` uniform in the unit ball of the group, ``||xi_G|| <= 1``.

* **scale** rule, which decides the groups and their magnitude ``m_G``:

  - ``"global"``: one group, all parameters together;
  - ``"layer"``: each parameter tensor is a group;
  - ``"filter"``: each slice along dim 0 (an output unit / conv filter) is a group; for a 1-D tensor
    (a bias, a norm scale) each entry is its own filter;
  - ``"element"``: each entry is a group.

  With ``relative=True`` the magnitude is ``m_G = radius * ||w_G||`` (so the perturbation follows
  the weights' own scale, which is what makes it invariant to the rescalings BatchNorm allows;
  Li et al. 2018's filter normalization, Kwon et al. 2021's ASAM); with ``relative=False`` it is
  ``m_G = radius``.

The perturbation is ``u_G = m_G * xi_G``. So ``sample(params, 0.05, distribution="ball",
scale="global", relative=False)`` is uniform in the Euclidean ball ``B(0, 0.05)`` of the NRS paper
(Zhao & Zhang 2022, Eq. 3), and the library's NRS/RPR default ``("ball", "filter", relative=True)``
keeps each filter's perturbation inside a ball of radius ``rho * ||w_filter||``: the paper samples
``u`` in ``B(0, rho)`` and then "normalizes u using w" (Algorithm 1, step 8).

Example::

    noise = fm.noise.Sampler(0.05, distribution="gaussian", scale="layer")
    u = noise(dict(model.named_parameters()), torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from flatminima._checks import check_choice, check_nonneg
from flatminima._nn import filter_rows
from flatminima._nn import is_norm_layer as is_norm_param
from flatminima._params import select_params

__all__ = ["DISTRIBUTIONS", "SCALES", "NoiseFn", "ParamSelector", "Sampler", "check_noise_output",
           "check_radius", "is_norm_param", "named_trainable_params", "sample"]

DISTRIBUTIONS = ("gaussian", "uniform", "sphere", "ball")
SCALES = ("global", "layer", "filter", "element")

NoiseFn = Callable[[dict[str, Tensor], "torch.Generator | None"], dict[str, Tensor]]
ParamSelector = Iterable[str] | Callable[[str, Tensor], bool] | str | None


def check_radius(value: float, name: str = "radius") -> float:
    """Validate a non-negative finite number (a perturbation size) and return it as a float."""
    return check_nonneg(value, name)


def _draw(shape: torch.Size, like: Tensor, generator: torch.Generator | None, kind: str) -> Tensor:
    # Draw on the generator's device (CPU generators are the common case) then move: a CPU
    # generator cannot drive a CUDA kernel, and results stay identical across devices.
    device = generator.device if generator is not None else like.device
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    z = torch.empty(shape, device=device, dtype=dtype)
    if kind == "normal":
        z.normal_(generator=generator)
    elif kind == "symmetric":
        z.uniform_(-1.0, 1.0, generator=generator)
    else:
        z.uniform_(0.0, 1.0, generator=generator)
    return z.to(device=like.device, dtype=like.dtype)


def _group_view(t: Tensor, scale: str) -> Tensor:
    """Reshape ``t`` to (num_groups, group_size) for the per-tensor scale rules."""
    if scale == "layer":
        return t.reshape(1, -1)
    if scale == "filter":
        return filter_rows(t)
    return t.reshape(-1, 1)  # element


def _unit_draw(
    rows: int, cols: int, like: Tensor, generator: torch.Generator | None, distribution: str
) -> tuple[Tensor, Tensor | None]:
    """``rows`` independent unit draws of dimension ``cols``, as ``(z, row_factor)``.

    The draw is ``z * row_factor`` (``row_factor`` of shape ``(rows, 1)``, ``None`` for 1): the
    per-row factor is kept apart so that the caller folds it with the group magnitude into a
    single multiplication over all entries (the sampler is on every step's path).
    """
    shape = torch.Size((rows, cols))
    if distribution == "uniform":
        return _draw(shape, like, generator, "symmetric"), None
    z = _draw(shape, like, generator, "normal")
    if distribution == "gaussian":
        return z, None
    # A normalized Gaussian is uniform on the sphere; scaling by U^(1/d) fills the ball uniformly.
    factor = 1.0 / z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    if distribution == "ball":
        factor = factor * _draw(torch.Size((rows, 1)), like, generator, "uniform") ** (1.0 / cols)
    return z, factor


def sample(
    params: Mapping[str, Tensor],
    radius: float,
    *,
    distribution: str = "ball",
    scale: str = "filter",
    relative: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Draw one perturbation ``u`` (a dict like ``params``) with ``u_G = m_G * xi_G``.

    See the module docstring for the meaning of ``distribution``, ``scale`` and ``relative``.
    Parameters are processed in the mapping's order, so the same generator state gives the same
    draw. ``radius=0`` gives exact zeros.
    """
    check_choice(distribution, DISTRIBUTIONS, "noise distribution")
    check_choice(scale, SCALES, "noise scale")
    radius = check_radius(radius)
    with torch.no_grad():
        if scale == "global":
            return _sample_global(params, radius, distribution, relative, generator)
        out: dict[str, Tensor] = {}
        for name, w in params.items():
            wg = _group_view(w.detach(), scale)
            z, factor = _unit_draw(wg.shape[0], wg.shape[1], w, generator, distribution)
            if relative:
                m = wg.norm(dim=1, keepdim=True) if scale != "element" else wg.abs()
                m = m * radius if factor is None else m * (factor * radius)
            else:
                m = radius if factor is None else factor * radius
            out[name] = z.mul_(m).reshape(w.shape)
        return out


def _sample_global(
    params: Mapping[str, Tensor],
    radius: float,
    distribution: str,
    relative: bool,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    names = list(params)
    if not names:
        return {}
    tensors = [params[n].detach() for n in names]
    numel = sum(t.numel() for t in tensors)
    like = tensors[0]
    z, factor = _unit_draw(1, numel, like, generator, distribution)
    m = radius
    if relative:
        m = radius * float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))
    flat = z.reshape(-1).mul_(m if factor is None else factor.reshape(()) * m)
    out, offset = {}, 0
    for n, t in zip(names, tensors, strict=True):
        out[n] = flat[offset : offset + t.numel()].reshape(t.shape).to(t.dtype)
        offset += t.numel()
    return out


class Sampler:
    """A noise callable ``noise(params, generator) -> dict`` with a settable ``radius``.

    ``Sampler(radius, distribution="ball", scale="filter", relative=True)``; all four are plain
    attributes, so a schedule can change them between steps.
    """

    def __init__(
        self,
        radius: float,
        distribution: str = "ball",
        scale: str = "filter",
        relative: bool = True,
    ) -> None:
        check_choice(distribution, DISTRIBUTIONS, "noise distribution")
        check_choice(scale, SCALES, "noise scale")
        self.radius = check_radius(radius)
        self.distribution = distribution
        self.scale = scale
        self.relative = bool(relative)

    def __call__(
        self, params: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        return sample(
            params,
            self.radius,
            distribution=self.distribution,
            scale=self.scale,
            relative=self.relative,
            generator=generator,
        )

    def __repr__(self) -> str:
        return (
            f"Sampler(radius={self.radius}, distribution={self.distribution!r}, "
            f"scale={self.scale!r}, relative={self.relative})"
        )


def named_trainable_params(
    model: nn.Module, params: ParamSelector = None
) -> dict[str, nn.Parameter]:
    """The model's trainable parameters by name, optionally restricted: the one selection every
    method and measurement uses (:func:`flatminima._params.select_params`; ``None``, a list of
    names, a predicate, ``"weights"``, ``"no_norm"`` or ``"last_layer"``)."""
    return select_params(model, params)


def check_noise_output(
    noise: Mapping[str, Tensor], params: Mapping[str, Tensor], source: object
) -> None:
    """Raise ``ValueError`` if a ``noise=`` callable returned the wrong names or shapes."""
    if not isinstance(noise, Mapping):
        kind = type(noise).__name__
        raise ValueError(f"noise {source!r} must return a dict of tensors, got {kind}")
    for name, p in params.items():
        if name not in noise:
            raise ValueError(f"noise {source!r} returned no perturbation for parameter {name!r}")
        u = noise[name]
        if not isinstance(u, Tensor) or u.shape != p.shape:
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(
                f"noise {source!r} returned shape {shape} for parameter {name!r}, "
                f"expected {tuple(p.shape)}"
            )
