"""The curvature of a model's loss as a linear operator on one flat parameter vector.

For a model ``f``, a loss ``loss_fn`` and batches ``B_1..B_K`` of sizes ``n_1..n_K`` the measured
objective is the size-weighted mean loss

    L(w) = sum_b (n_b / N) * loss_fn(f(w; x_b), y_b),      N = sum_b n_b,

over the selected parameters ``w`` (every other parameter and buffer fixed). Two curvatures:

* ``"hessian"``: ``H = d^2 L / dw^2``, the exact Hessian.
* ``"ggn"``: the generalized Gauss-Newton ``G = sum_b (n_b/N) J_b^T H_b J_b`` with
  ``J_b = d f(w; x_b) / dw`` and ``H_b = d^2 loss_fn / d f^2`` (positive semi-definite for
  convex losses such as cross-entropy; Schraudolph 2002). For a last layer that is linear in its
  own weights (a classifier ``nn.Linear``) the two coincide exactly.

Hessian-vector products come in two flavours (``mode=``):

* ``"double_backward"`` (Pearlmutter 1994 via reverse-over-reverse): the gradient graph of each
  batch is built once and kept, so every product costs one backward pass through it. Blocks of
  vectors go through ``autograd.grad(..., is_grads_batched=True)``.
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``; each product re-runs the
  forward and backward with dual numbers, blocks of vectors through ``torch.func.vmap``.

``"auto"`` picks double-backward for the Hessian: on this project's CPU measurement
(``benchmarks/results/hessian.md``, section 1) it beat forward-over-reverse both with the graph
kept and rebuilt per product. The GGN is always computed with forward-mode ``jvp`` and ``vjp``.

Two caches make repeated products cheap without changing the operator:

* the gradient graph of every batch is kept when all of them fit a memory budget (a quarter of
  the memory available; the size of one graph is measured while it is built), else rebuilt per
  batch and product; a single batch always keeps its graph, which costs no more peak memory;
* when the selected parameters all belong to one module whose output is the model's output (a
  last layer), the inputs of that module are computed once and every product runs through it
  alone (:mod:`flatminima.hessian._trunk`, which checks that this is exact).

And eval-mode BatchNorm is evaluated as the affine map it is, folded into the convolution or
linear layer before it where that is exact (:mod:`flatminima.hessian._eval_norm`): the same
function, with a much cheaper double-backward than that of the fused kernel. A convolution of
the data (the first layer) gets a double-backward that skips the data's second-order gradient,
which PyTorch's computes anyway (:mod:`flatminima.hessian._data_conv`), and ReLU and
max-pooling one without the zero tensors PyTorch's adds (:mod:`flatminima.hessian._piecewise`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from flatminima._checks import check_callable, check_choice
from flatminima._nn import LossFn, frozen_norm_stats, model_device, tracking_norm_layers
from flatminima._params import (
    Batch,
    FlatParams,
    ParamSpec,
    as_batches,
    batch_weights,
    measuring_mode,
    select_params,
)
from flatminima.hessian._data_conv import data_convolutions
from flatminima.hessian._eval_norm import affine_batchnorm, eval_batchnorms, find_folds
from flatminima.hessian._piecewise import lean_piecewise_linear
from flatminima.hessian._trunk import Trunk, capture_trunk

CURVATURES = ("hessian", "ggn")
MODES = ("auto", "double_backward", "forward_over_reverse")


def memory_budget(device: torch.device) -> int:
    """Bytes the caches may use: a quarter of the memory available on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2**31


def vectors_that_fit(n: int, like: Tensor, copies: float = 1.0) -> int:
    """How many ``n``-vectors in ``like``'s dtype fit the memory budget of ``like``'s device when
    each is held ``copies`` times at the peak (a restart or a QR copies the basis)."""
    return int(memory_budget(like.device) // (copies * n * like.element_size()))


class _SavedBytes:
    """Count the bytes autograd saves while a graph is built (each storage once)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self._seen: set[int] = set()

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t


def _default_loss(loss_fn: LossFn | None) -> LossFn:
    if loss_fn is None:
        return torch.nn.functional.cross_entropy
    return check_callable(loss_fn, "loss_fn")


class CurvatureOperator:
    """``v -> C v`` for the Hessian or GGN ``C`` of the size-weighted mean loss.

    Build it once, then call :meth:`matvec` / :meth:`matmat` many times: the Lanczos, trace
    (krylov, Hutch++, Hutchinson) and SLQ routines of :mod:`flatminima.hessian` are written
    against this class. The model must stay in the wanted mode (see
    :func:`flatminima._params.measuring_mode`) while it is used.

    Attributes: ``size`` (the dimension ``n``), ``flat`` (the name/shape layout), ``w0`` (the
    flat selected parameters), ``num_matvecs`` (products computed so far; a block of ``b``
    vectors counts ``b``), ``trunk`` (the reused trunk, or ``None``).

    The speed-ups of the module docstring can be switched off one by one (for comparisons):
    ``cache_graph`` (``None``: keep every batch's graph if all fit ``memory`` bytes; ``True`` /
    ``False``: always / never), ``reuse_trunk`` (its inputs may use ``memory / 2`` bytes),
    ``affine_norms`` and ``fold_norms`` (the latter only acts with the former), ``data_convs``
    (:mod:`flatminima.hessian._data_conv`) and ``lean_piecewise``
    (:mod:`flatminima.hessian._piecewise`), both for double-backward Hessian products only.
    ``memory`` defaults to a quarter of the memory available on the device. ``folds`` lists the
    ``(layer, norm)`` pairs folded.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: object,
        params: ParamSpec = None,
        *,
        curvature: str = "hessian",
        mode: str = "auto",
        cache_graph: bool | None = None,
        reuse_trunk: bool = True,
        affine_norms: bool = True,
        fold_norms: bool = True,
        data_convs: bool = True,
        lean_piecewise: bool = True,
        memory: int | None = None,
    ) -> None:
        check_choice(curvature, CURVATURES, "curvature")
        check_choice(mode, MODES, "hvp mode")
        if torch.is_inference_mode_enabled():
            raise ValueError("Hessian measurements differentiate the loss: call them outside "
                             "torch.inference_mode() (torch.no_grad() is fine)")
        self.model = model
        self.loss_fn = _default_loss(loss_fn)
        self.batches: list[Batch] = as_batches(data, model_device(model))
        self.weights = batch_weights(self.batches)
        selected = select_params(model, params, example_input=self.batches[0][0])
        self.names = list(selected)
        self.flat = FlatParams.of(selected)
        self.size = self.flat.size
        detached = {n: p.detach() for n, p in selected.items()}
        self.w0 = self.flat.flatten(detached)
        # Every other parameter enters as a constant: no graph through the frozen part.
        self.fixed = {
            n: p.detach() for n, p in model.named_parameters() if n not in selected
        }
        self.curvature = curvature
        if mode == "auto":
            mode = "double_backward"
        self.mode = mode
        # Eval-mode BatchNorm is an affine map: written as one, its double-backward is cheaper,
        # and folded into the layer before it, cheaper still.
        self._norms = eval_batchnorms(model) if affine_norms else []
        # Found once: the model's modes stay as they are while the operator is used. Train-mode
        # BatchNorm then normalizes with batch statistics and updates no running statistic (an
        # in-place write that torch.func transforms refuse). InstanceNorm's forward updates its
        # statistics whatever the flag says, as it did before; the measurement restores buffers.
        self._train_norms = tracking_norm_layers(model)
        self.folds = find_folds(model, self._norms, {**self.fixed, **detached},
                                self.batches[0][0][:8]) if fold_norms else []
        # Convolutions of the data skip the input's second-order gradient, ReLU and max-pooling
        # the zero tensors of theirs (autograd Functions of their own, so only for the
        # reverse-over-reverse Hessian product).
        reverse_over_reverse = curvature == "hessian" and mode == "double_backward"
        self.data_convs = data_convs and reverse_over_reverse
        self.lean_piecewise = lean_piecewise and reverse_over_reverse
        self.memory = memory_budget(self.w0.device) if memory is None else int(memory)
        self.trunk: Trunk | None = None
        if reuse_trunk:
            self.trunk = capture_trunk(model, detached, self.fixed, self.batches,
                                       self.memory // 2)
        if self.trunk is not None:
            # Products run the trunk's module alone: a fold reaching outside it (a last-layer
            # BatchNorm folded into the frozen layer before it) would drop the selected weights.
            inside = {id(m) for m in self.trunk.module.modules()}
            self.folds = [(layer, norm) for layer, norm in self.folds
                          if id(layer) in inside and id(norm) in inside]
        # None: decided by the measured size of the first graph (see _double_backward).
        self.cache_graph = cache_graph
        self.num_matvecs = 0
        self._graphs: list[tuple[Tensor, Tensor] | None] = [None] * len(self.batches)

    # -- the objective as a function of the flat vector -------------------------------------
    def outputs(self, w: Tensor, i: int) -> Tensor:
        """Model outputs on batch ``i`` at flat parameters ``w`` (other parameters fixed)."""
        params = self.flat.unflatten(w)
        none = contextlib.nullcontext()
        convs = data_convolutions(self.model) if self.data_convs else none
        piecewise = lean_piecewise_linear() if self.lean_piecewise else none
        with affine_batchnorm(self._norms, self.folds), convs, piecewise, \
                frozen_norm_stats(self._train_norms):
            if self.trunk is not None:
                return self.trunk.outputs(params, i)
            return functional_call(self.model, {**self.fixed, **params}, (self.batches[i][0],))

    def batch_loss(self, w: Tensor, i: int) -> Tensor:
        return self.loss_fn(self.outputs(w, i), self.batches[i][1])

    def loss(self, w: Tensor | None = None) -> Tensor:
        """The size-weighted mean loss at ``w`` (default: the model's weights)."""
        w = self.w0 if w is None else w
        with torch.no_grad():
            return sum(c * self.batch_loss(w, i) for i, c in enumerate(self.weights))

    # -- products ------------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``C v`` for one flat vector ``v`` of shape ``(n,)``."""
        self._check(v, 1)
        return self.matmat(v.unsqueeze(0)).squeeze(0)

    def matmat(self, vs: Tensor) -> Tensor:
        """``C v_i`` for a block ``vs`` of shape ``(b, n)``, returned as ``(b, n)``."""
        self._check(vs, 2)
        vs = vs.to(device=self.w0.device, dtype=self.w0.dtype)
        self.num_matvecs += vs.shape[0]
        if self.curvature == "ggn":
            return self._ggn(vs)
        if self.mode == "double_backward":
            return self._double_backward(vs)
        return self._forward_over_reverse(vs)

    def _check(self, v: Tensor, dim: int) -> None:
        if v.dim() != dim or v.shape[-1] != self.size:
            raise ValueError(
                f"vector of shape {tuple(v.shape)} does not match the {self.size} selected "
                "parameters"
            )

    def _grad_graph(self, i: int, counter: _SavedBytes | None = None) -> tuple[Tensor, Tensor]:
        w = self.w0.detach().clone().requires_grad_(True)
        hooks = (contextlib.nullcontext() if counter is None else
                 torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack))
        # Grad mode on even inside a caller's torch.no_grad() (an evaluation loop): the graph is
        # what the products differentiate.
        with hooks, torch.enable_grad():
            loss = self.weights[i] * self.batch_loss(w, i)
            if not loss.requires_grad:   # the loss does not use the selection: zero curvature
                return w, torch.zeros_like(w)
            (g,) = torch.autograd.grad(loss, w, create_graph=True, allow_unused=True)
        return w, torch.zeros_like(w) if g is None else g

    def _graph(self, i: int) -> tuple[Tensor, Tensor]:
        """Batch ``i``'s gradient graph ``(w, g)``, ``g`` weighted by the batch's share: the
        kept one, or built now (and kept if the policy says so)."""
        graph = self._graphs[i]
        if graph is None:
            decide = self.cache_graph is None and len(self.batches) > 1
            counter = _SavedBytes() if decide else None
            graph = self._grad_graph(i, counter)
            if counter is not None:
                # Keep every batch's graph only if all of them fit the budget.
                self.cache_graph = counter.nbytes * len(self.batches) <= self.memory
            if self.cache_graph is not False:
                self._graphs[i] = graph
        return graph

    def _double_backward(self, vs: Tensor) -> Tensor:
        out = torch.zeros_like(vs)
        for i in range(len(self.batches)):
            out += self._backward_through(*self._graph(i), vs)
        return out

    def gradient(self) -> Tensor:
        """The gradient of the size-weighted mean loss at ``w0`` (flat, detached).

        Where double-backward products keep the gradient graphs, the gradient is read off them
        (building them now, which the first product would otherwise do): it costs nothing
        extra. Elsewhere it is one forward and backward pass per batch. It does not count as a
        product.
        """
        total = torch.zeros_like(self.w0)
        for i, c in enumerate(self.weights):
            keeps = (self.curvature == "hessian" and self.mode == "double_backward"
                     and self.cache_graph is not False)
            if keeps:
                g = self._graph(i)[1]
            else:
                w = self.w0.detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = c * self.batch_loss(w, i)
                    g = (torch.autograd.grad(loss, w, allow_unused=True)[0]
                         if loss.requires_grad else None)
                if g is None:  # the loss does not depend on the selected parameters
                    g = torch.zeros_like(self.w0)
            total += g.detach()
        return total

    @staticmethod
    def _backward_through(w: Tensor, g: Tensor, vs: Tensor) -> Tensor:
        if not g.requires_grad:  # loss linear in w: zero curvature
            return torch.zeros_like(vs)
        if vs.shape[0] == 1:
            (hv,) = torch.autograd.grad(g, w, vs[0], retain_graph=True, allow_unused=True)
            return torch.zeros_like(vs) if hv is None else hv.unsqueeze(0)
        (hv,) = torch.autograd.grad(
            g, w, vs, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return torch.zeros_like(vs) if hv is None else hv

    def _forward_over_reverse(self, vs: Tensor) -> Tensor:
        try:
            return self._forward_over_reverse_products(vs)
        except (RuntimeError, NotImplementedError) as e:
            if "forward AD" not in str(e) and "ZeroTensor" not in str(e):
                raise
            raise ValueError("mode='forward_over_reverse' needs forward-mode differentiation "
                             "of the loss's and model's backward, which PyTorch lacks here; "
                             f"use mode='double_backward' ({str(e).splitlines()[0]})") from e

    def _forward_over_reverse_products(self, vs: Tensor) -> Tensor:
        out = torch.zeros_like(vs)
        for i, c in enumerate(self.weights):
            grad_fn = grad(lambda w, i=i: self.batch_loss(w, i))

            def hvp_one(v: Tensor, grad_fn: Callable = grad_fn) -> Tensor:
                return jvp(grad_fn, (self.w0,), (v,))[1]

            hv = hvp_one(vs[0]).unsqueeze(0) if vs.shape[0] == 1 else vmap(hvp_one)(vs)
            out += c * hv
        return out

    def _ggn(self, vs: Tensor) -> Tensor:
        out = torch.zeros_like(vs)
        for i, c in enumerate(self.weights):
            y = self.batches[i][1]
            f = lambda w, i=i: self.outputs(w, i)  # noqa: E731
            z, vjp_fn = vjp(f, self.w0)
            loss_grad = grad(lambda o, y=y: self.loss_fn(o, y))

            def ggn_one(v: Tensor, f: Callable = f, z: Tensor = z, vjp_fn: Callable = vjp_fn,
                        loss_grad: Callable = loss_grad) -> Tensor:
                jv = jvp(f, (self.w0,), (v,))[1]              # J v
                # H_out J v by reverse-over-reverse on the loss alone (H_out is symmetric):
                # PyTorch's forward mode fails inside mse_loss's and huber_loss's backward.
                hjv = grad(lambda o: (loss_grad(o) * jv).sum())(z)
                return vjp_fn(hjv)[0]                           # J^T H_out J v

            gv = ggn_one(vs[0]).unsqueeze(0) if vs.shape[0] == 1 else vmap(ggn_one)(vs)
            out += c * gv
        return out

    def release(self) -> None:
        """Free the kept gradient graphs and trunk inputs."""
        self._graphs = [None] * len(self.batches)
        self.trunk = None


def hvp(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    v: Tensor | dict[str, Tensor],
    *,
    params: ParamSpec = None,
    curvature: str = "hessian",
    mode: str = "auto",
    train: bool = False,
) -> Tensor | dict[str, Tensor]:
    """The Hessian (or GGN) of the size-weighted mean loss times ``v``.

    ``v`` is a flat vector over the selected parameters (in ``model.named_parameters()`` order)
    or a dict ``{name: tensor}``; the result has the same form. Eval mode unless ``train=True``.

    Example::

        hv = fm.hessian.hvp(model, F.cross_entropy, (x, y), {n: torch.ones_like(p)
                             for n, p in model.named_parameters()})
    """
    with measuring_mode(model, train):
        op = CurvatureOperator(model, loss_fn, data, params, curvature=curvature, mode=mode)
        if isinstance(v, dict):
            missing = [n for n in op.names if n not in v]
            if missing:
                raise ValueError(f"v has no entry for parameter {missing[0]!r}")
            hv = op.matvec(op.flat.flatten(v))
            return {n: t.detach() for n, t in op.flat.unflatten(hv).items()}
        if not isinstance(v, Tensor):
            raise ValueError(f"v must be a tensor or a dict of tensors, got {type(v).__name__}")
        return op.matvec(v.reshape(-1) if v.dim() != 1 else v).detach()
