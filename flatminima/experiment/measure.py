"""``flatminima measure RUN``: flatness of a saved checkpoint, as numbers and plots.

``RUN`` is a run folder (its ``last.pt``) or a checkpoint file written by ``flatminima train``.
The config saved in the checkpoint rebuilds the model and its data; the measurements use a fixed
subset of the training set (``--examples``), in eval mode:

* top-``k`` Hessian eigenvalues (Lanczos) and the trace (Hutchinson on the complement of a Lanczos
  basis, ``fm.hessian.trace``'s default ``"krylov"``), ``fm.hessian``;
* model divergence ``E_u KL(f_w || f_{w+u})`` at ``--rho``, ``fm.divergence``;
* a 1-D line and a 2-D plane of loss / accuracy along filter-normalized random directions,
  ``fm.landscape`` (Li et al. 2018);
* basin radius along random directions, ``fm.volume``.

Results go to ``--out`` (default ``<run>/measure``) as ``measures.json`` and PNG plots, written in
a temporary folder and renamed, so a failed measurement leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.config import Config, ConfigError, config_from_dict


def add_parser(sub: Any) -> None:
    p = sub.add_parser("measure", help="Hessian, model divergence, landscape and basin radius "
                                       "of a saved checkpoint, with plots")
    p.add_argument("run", help="run folder (with last.pt) or checkpoint file")
    p.add_argument("--examples", type=int, default=1000,
                   help="training examples to measure on (default 1000)")
    p.add_argument("--k", type=int, default=3, help="number of top Hessian eigenvalues")
    p.add_argument("--starts", type=int, default=1,
                   help="independent Lanczos start vectors for the eigenvalues (the largest "
                        "value at each rank is kept; a start can skip one of a tight cluster)")
    p.add_argument("--start", choices=["auto", "random", "gradient"], default="auto",
                   help="first Lanczos start vector: random, random plus the loss gradient, or "
                        "auto (the gradient one for --k 1 only; default)")
    p.add_argument("--trace-matvecs", type=int, default=60,
                   help="trace estimator's Hessian-vector product budget (0 skips the trace)")
    p.add_argument("--rho", type=float, default=0.05, help="model divergence radius")
    p.add_argument("--samples", type=int, default=10, help="model divergence samples")
    p.add_argument("--line", type=int, default=41, help="points of the 1-D line (0 skips)")
    p.add_argument("--plane", type=int, default=21,
                   help="points per side of the 2-D plane (0 skips)")
    p.add_argument("--span", type=float, default=1.0, help="landscape extent (+- span)")
    p.add_argument("--basin", type=int, default=10,
                   help="random directions for the basin radius (0 skips)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random estimate")
    p.add_argument("--out", default=None, help="output folder (default <run>/measure)")
    p.add_argument("-q", "--quiet", action="store_true")


def _checkpoint_path(run: str) -> Path:
    path = Path(run)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise ConfigError(f"run {run!r}: no checkpoint found (expected a run folder with "
                          "last.pt or a .pt file)")
    return path


def load_run(cfg: Config, *, examples: int, state: dict[str, Any] | None = None,
             device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[Tensor, Tensor],
                                                         Any]:
    """The trained model of a run (from ``state`` or ``<cfg.out>/last.pt``) in eval mode, and a
    fixed batch of the first ``examples`` training examples (normalized, as in training)."""
    from flatminima.data import DeviceLoader
    from flatminima.experiment.train import build_data, build_model

    if state is None:
        state = ckpt.load(Path(cfg.out) / "last.pt")
    d = build_data(cfg)
    model = build_model(cfg, d["data"])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise ckpt.CheckpointError(f"checkpoint does not match model {cfg.model!r}: "
                                   f"{' '.join(str(e).split())[:160]}") from None
    model.to(device).eval()
    x, y = d["train"]
    n = min(examples, len(y))
    loader = DeviceLoader(x[:n], y[:n], n, shuffle=False, device=device,
                          mean=d["data"].mean, std=d["data"].std)
    batch = next(iter(loader))
    return model, batch, d


def measure_batch(model: nn.Module, batch: tuple[Tensor, Tensor], *, rho: float, samples: int,
                  seed: int = 0) -> dict[str, float]:
    """Model divergence (NRS paper, Eq. 4) of ``model`` on ``batch``."""
    from flatminima.divergence import model_divergence

    gen = torch.Generator().manual_seed(seed)
    return {"divergence": float(model_divergence(model, batch, rho, samples, generator=gen))}


def cached_in_run(cfg: Config, filename: str, key: dict[str, Any],
                  compute: Any) -> dict[str, float]:
    """``compute()`` of a finished run, kept in ``<run>/<filename>`` under ``key``: a second
    report (or a restarted one) reads the values instead of measuring again."""
    cache = Path(cfg.out) / filename
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return saved["values"]
        except (OSError, ValueError):
            pass
    values = compute()
    ckpt.atomic_write_text(cache, json.dumps({"key": key, "values": values}))
    return values


def _positive(name: str, value: float | int, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"--{name}={value!r}: must be {'>= 0' if allow_zero else '> 0'}")


def _check_writable(out: Path) -> None:
    """Raise ``OSError`` now if the report folder beside ``out`` cannot be created."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryDirectory(prefix=f".{out.name}.probe.", dir=out.parent).cleanup()


def run(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from flatminima import hessian, landscape, plots, volume
    from flatminima.experiment.logs import progress
    from flatminima.experiment.report import atomic_dir
    from flatminima.experiment.train import loss_function

    for name in ("examples", "k", "starts", "samples"):
        _positive(name, getattr(args, name))
    for name in ("trace_matvecs", "line", "plane", "basin", "rho"):
        _positive(name.replace("_", "-"), getattr(args, name), allow_zero=True)
    _positive("span", args.span)
    path = _checkpoint_path(args.run)
    state = ckpt.load(path)
    if "config" not in state:
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} has no saved config")
    cfg = config_from_dict(state["config"])
    model, batch, _ = load_run(cfg, examples=args.examples, state=state)
    loss_fn = loss_function(cfg)
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731 - same seed per estimate
    out = Path(args.out) if args.out else path.parent / "measure"
    _check_writable(out)  # before minutes of measuring, not after

    steps = ["hessian", "trace", "divergence", "line", "plane", "basin"]
    bar = progress(steps, desc="measure", quiet=args.quiet, unit="step", leave=False)
    res: dict[str, Any] = {"checkpoint": str(path), "epoch": int(state.get("epoch", 0)),
                           "examples": int(len(batch[1]))}
    figures = {}
    for step in bar:
        bar.set_postfix_str(step)
        if step == "hessian":
            eig = hessian.eigenvalues(model, loss_fn, batch, k=args.k, starts=args.starts,
                                      start=args.start, generator=gen())
            res["hessian_eigenvalues"] = [float(v) for v in eig]
            res["hessian_starts"] = args.starts
            res["hessian_start"] = args.start
        elif step == "trace" and args.trace_matvecs > 0:
            tr = hessian.trace(model, loss_fn, batch, num_matvecs=args.trace_matvecs,
                               generator=gen())
            res["hessian_trace"] = float(tr)
            res["hessian_trace_std_error"] = float(getattr(tr, "std_error", math.nan))
            res["hessian_trace_method"] = getattr(tr, "method", "")
        elif step == "divergence" and args.rho > 0:
            res.update(measure_batch(model, batch, rho=args.rho, samples=args.samples,
                                     seed=args.seed))
            res["divergence_rho"] = args.rho
        elif step == "line" and args.line > 0:
            g = gen()
            d = landscape.random_direction(model, generator=g)
            alphas = torch.linspace(-args.span, args.span, args.line)
            ls = landscape.line(model, loss_fn, batch, d, alphas)
            res["line"] = {"alphas": alphas.tolist(), "loss": ls.loss.tolist(),
                           "accuracy": ls.accuracy.tolist()}
            figures["landscape_1d.png"] = plots.line_1d(
                alphas.tolist(), {"train loss": ls.loss.tolist()},
                title=f"{cfg.method}: loss along a filter-normalized direction")
        elif step == "plane" and args.plane > 0:
            g = gen()
            d1 = landscape.random_direction(model, generator=g)
            d2 = landscape.random_direction(model, generator=g)
            ab = torch.linspace(-args.span, args.span, args.plane)
            pl = landscape.plane(model, loss_fn, batch, d1, d2, ab, ab)
            res["plane"] = {"alphas": ab.tolist(), "loss": pl.loss.tolist()}
            # plane() indexes [alpha, beta]; contour wants [y, x], so transpose.
            figures["landscape_2d.png"] = plots.surface_2d(
                ab.tolist(), ab.tolist(), pl.loss.T.numpy(), label="train loss",
                title=f"{cfg.method}: loss on a random plane")
        elif step == "basin" and args.basin > 0:
            br = volume.basin_radius(model, F.cross_entropy, batch, num_directions=args.basin,
                                     generator=gen())
            radii = torch.as_tensor(br.radii, dtype=torch.float64).flatten()
            res["basin_radius_mean"] = float(radii.mean())
            res["basin_radius_min"] = float(radii.min())
            res["basin_radii"] = radii.tolist()
    bar.close()
    with atomic_dir(out) as tmp:
        ckpt.atomic_write_text(tmp / "measures.json", json.dumps(res, indent=1))
        for name, fig in figures.items():
            plots.save_figure(fig, tmp / name)
    summary = {k: v for k, v in res.items() if not isinstance(v, dict | list)
               or k == "hessian_eigenvalues"}
    print(json.dumps(summary, indent=1))
    print(f"measurements and plots: {out}")
    return 0
