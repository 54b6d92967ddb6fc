"""One training run: ``train(cfg) -> metrics``, a single readable function (nanoGPT style).

The run folder ``cfg.out`` receives

* ``config.yaml``  the resolved config (every default filled in);
* ``last.pt``      an atomic checkpoint after every epoch (model, optimizer, scaler, method state,
                   every random state, metric history);
* ``metrics.csv``  one row per epoch; ``tb/`` the same as TensorBoard scalars;
* ``metrics.json`` the final metrics, written last: its presence marks a finished run.

Started again with the same config, a run resumes from ``last.pt`` and finishes with bitwise the
same weights and metrics as an uninterrupted run on CPU (the loader's order depends only on
``seed`` and the epoch; every other random state is in the checkpoint).

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in ``DistributedDataParallel``; each
rank trains on its own shard of the training set (a fixed ``rank::world_size`` split, equal
lengths, reshuffled within the shard each epoch) and draws its own perturbation (generator seeded
by ``seed`` and rank), as in the NRS paper's practical implementation. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.config import Config, ConfigError, config_from_dict, dump_yaml
from flatminima.experiment.logs import RunLogger, progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- pieces

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps': no MPS device is available")
    return torch.device(name)


def lr_at(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    cosine: ``lr * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of post-warm-up steps done;
    step: ``lr * lr_gamma ** (number of milestones passed)``, milestones as fractions of training
    (<= 1) or epoch numbers (> 1).
    """
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    epoch = step / steps_per_epoch
    passed = sum(epoch >= (m * cfg.epochs if m <= 1 else m) for m in cfg.milestones)
    return cfg.lr * cfg.lr_gamma ** passed


def split_validation(x: Tensor, y: Tensor, fraction: float, seed: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hold out ``fraction`` of each class (at least one example per class) as validation."""
    if fraction <= 0:
        return x, y, x[:0], y[:0]
    g = torch.Generator().manual_seed(seed)
    val_idx = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_idx.append(idx[: max(1, round(fraction * len(idx)))])
    val = torch.cat(val_idx).sort().values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    if keep.sum() == 0:
        raise ConfigError(f"val_split={fraction}: leaves no training data")
    return x[keep], y[keep], x[val], y[val]


def shard(x: Tensor, y: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s share ``rank::world`` of a data set, cut to equal length on every rank
    (DistributedSampler's padding would repeat examples; a step count that differs between ranks
    would hang the all-reduce)."""
    n = (len(y) // world) * world
    return x[rank:n:world], y[rank:n:world]


# Evaluation on a CPU: at most CPU_EVAL_BATCH examples per pass, images channels-last. In eval
# mode an example's output does not depend on its batch; beyond ~128 small images the
# activations leave the caches and large freed blocks go back to the OS after every batch
# (page faults), so bigger batches are only slower, and channels-last is the CPU convolutions'
# fast layout (measured per image in benchmarks/results/train_epoch.md). Module constants, so
# that the benchmark can set them back.
CPU_EVAL_BATCH = 128
CPU_EVAL_CHANNELS_LAST = True


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, loss_fn: Any) -> tuple[float, float, float]:
    """Mean loss, top-1 and top-5 accuracy (%) over a loader, in eval mode.

    Top-5 counts an example as correct when its label is among the five largest logits (ImageNet's
    second number, Russakovsky et al. 2015); with five classes or fewer it is NaN, not a trivial
    100. Sums are kept on the device (float64 per-example losses) and read once at the end, so no
    batch waits for the previous one to be synchronized.
    """
    was_training = model.training
    model.eval()
    loss_sum: Tensor | float = 0.0
    correct: Tensor | int = 0
    correct5: Tensor | int = 0
    count = 0
    classes = 0
    for x, y in loader:
        out = model(x)
        loss_sum = loss_sum + loss_fn(out, y, reduction="none").double().sum()
        correct = correct + (out.argmax(1) == y).sum()
        classes = out.shape[1]
        if classes > 5:
            correct5 = correct5 + (out.topk(5, dim=1).indices == y[:, None]).any(1).sum()
        count += len(y)
    model.train(was_training)
    if count == 0:
        return math.nan, math.nan, math.nan
    top5 = 100.0 * int(correct5) / count if classes > 5 else math.nan
    return float(loss_sum) / count, 100.0 * int(correct) / count, top5


def _dist_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _kept(path: Path, epochs_done: int) -> str:
    if epochs_done == 0:
        return "no checkpoint was written (it diverged in the first epoch)"
    return f"last good checkpoint (epoch {epochs_done}) kept in {str(path)!r}"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, subset_per_class: int | None, label_noise: float,
             seed: int, classes: tuple[int, ...] | None = None) -> Any:
    # Kept per process: a sweep or compare trains many cells on one data set, and generating
    # MNIST-1D (or decoding image files) costs seconds each time. The tensors are never modified.
    from flatminima.data import get_dataset

    return get_dataset(name, root, subset_per_class=subset_per_class, label_noise=label_noise,
                       seed=seed, classes=classes)


def build_data(cfg: Config) -> dict[str, Any]:
    """The data set split into train / val / test tensors, plus its shape information."""
    data = _dataset(cfg.dataset, cfg.data_root, cfg.subset_per_class, cfg.label_noise,
                    cfg.data_seed, tuple(cfg.data_classes) if cfg.data_classes else None)
    x_tr, y_tr, x_val, y_val = split_validation(data.x_train, data.y_train, cfg.val_split,
                                                cfg.data_seed)
    return {"data": data, "train": (x_tr, y_tr), "val": (x_val, y_val),
            "test": (data.x_test, data.y_test)}


def build_model(cfg: Config, data: Any) -> nn.Module:
    from flatminima.models import create_model

    try:
        return create_model(cfg.model, num_classes=data.num_classes,
                            input_shape=tuple(data.input_shape), **cfg.model_args)
    except TypeError as e:
        raise ConfigError(f"model {cfg.model!r}: {' '.join(str(e).split())}") from None


def param_groups(cfg: Config, model: nn.Module, input_shape: Any = None) -> Any:
    """The optimizer's parameters: all of them, or with ``body_lr`` two groups, every parameter
    but the head (``lr_scale = body_lr``) and the head (the last layer, ``lr_scale = 1``). The
    schedule sets each group's lr to ``lr_at(...) * lr_scale``."""
    if cfg.body_lr is None:
        return model.parameters()
    from flatminima._params import last_layer_names
    from flatminima.experiment.init import head_names

    head = set(head_names(model, input_shape) if input_shape is not None
               else last_layer_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n not in head], "lr": cfg.lr * cfg.body_lr,
             "lr_scale": cfg.body_lr},
            {"params": [p for n, p in named if n in head], "lr": cfg.lr, "lr_scale": 1.0}]


def build_optimizer(cfg: Config, model: nn.Module, input_shape: Any = None
                    ) -> torch.optim.Optimizer:
    params = param_groups(cfg, model, input_shape)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    # For AdamW, ``momentum`` is beta1 (the decay of its first-moment average; default 0.9 both).
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999),
                             weight_decay=cfg.weight_decay)


def loss_function(cfg: Config) -> Any:
    return functools.partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)


def autocast_dtype(name: str, device_type: str) -> torch.dtype:
    """The autocast dtype of ``amp_dtype``: ``auto`` is float16 on CUDA (with a GradScaler) and
    bfloat16 elsewhere (the CPU's autocast dtype)."""
    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def scheduled(method: Any, cfg: Config, total_steps: int) -> Any:
    """``method`` in ``fm.Every`` as ``method_every``/``_reuse``/``_start``/``_stop`` say (as it is
    at their defaults). The window's fractions of the run become optimizer-step counts here, so
    the method needs to know nothing of epochs, schedules or optimizers: it counts its calls."""
    if cfg.method_every == 1 and cfg.method_start == 0.0 and cfg.method_stop == 1.0:
        return method
    from flatminima.methods import Every

    start = round(cfg.method_start * total_steps)
    stop = None if cfg.method_stop >= 1.0 else max(start + 1, round(cfg.method_stop * total_steps))
    return Every(method, cfg.method_every, reuse=cfg.method_reuse, alpha=cfg.method_reuse_alpha,
                 start=start, stop=stop)


def finished_metrics(out: str | Path, cfg: Config) -> dict[str, Any] | None:
    """The final metrics of a finished run of ``cfg`` in ``out``, or None."""
    path = Path(out) / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("fingerprint") == cfg.fingerprint() else None


# ----------------------------------------------------------------------------- the run

def train(cfg: Config) -> dict[str, Any]:
    """Train one model as ``cfg`` says; return its final metrics (see the module doc)."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)
        if owns_group and dist.is_initialized():
            # Tear down the group we created (after every rank is done), or gloo's threads can
            # abort the interpreter at exit.
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def _train(cfg: Config) -> dict[str, Any]:
    from flatminima.data import DeviceLoader
    from flatminima.methods import create_method

    out = Path(cfg.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    device = resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    if cfg.resume and (done := finished_metrics(out, cfg)) is not None:
        return done

    # Data on the device, loaders seeded by (seed, epoch) so the order is reproducible on resume.
    d = build_data(cfg)
    data = d["data"]
    x_tr, y_tr = shard(*d["train"], rank, world) if world > 1 else d["train"]
    norm = {"mean": data.mean, "std": data.std, "device": device}
    train_loader = DeviceLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                augment=None if cfg.augment == "none" else cfg.augment, **norm)
    # Evaluation: on a CPU at most CPU_EVAL_BATCH examples per pass, images channels-last (the
    # CPU convolutions' fast layout; only the evaluation passes, training is untouched).
    cpu = device.type == "cpu"
    eval_bs = min(cfg.eval_batch_size, CPU_EVAL_BATCH) if cpu else cfg.eval_batch_size
    eval_loaders = {split: DeviceLoader(*d[split], eval_bs, shuffle=False, **norm,
                                        channels_last=cpu and CPU_EVAL_CHANNELS_LAST
                                        and d[split][0].dim() == 4)
                    for split in ("train", "val", "test") if len(d[split][1]) > 0}

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data)
    if cfg.init_from is not None:  # fine-tuning: saved weights, head per init_head
        from flatminima.experiment.init import initialize

        initialize(model, cfg, data.input_shape)
    model = model.to(device)
    method = create_method(cfg.method, **cfg.hparams)
    optimizer = build_optimizer(cfg, model, data.input_shape)
    if "optimizer" in method.declared and method.optimizer is None:
        # A method that reads the optimizer's state (MSAM's momentum) gets the run's optimizer,
        # which exists only now; it reads it and never steps it.
        method.optimizer = optimizer
    probe = None
    if cfg.curvature_every > 0 and is_main:  # top Hessian eigenvalue etc. every N epochs
        from flatminima.experiment.curvature import CurvatureProbe

        probe = CurvatureProbe(cfg, d, device)
    # Each rank draws its own perturbation: a generator per rank, saved in the checkpoint.
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    use_amp = cfg.amp and device.type in ("cuda", "cpu")
    amp_dtype = autocast_dtype(cfg.amp_dtype, device.type)
    # float16 needs loss scaling against underflow; bfloat16 has float32's range and does not.
    scaler = (torch.amp.GradScaler(device.type)
              if use_amp and amp_dtype == torch.float16 else None)
    loss_fn = loss_function(cfg)
    steps_per_epoch = len(train_loader)
    method = scheduled(method, cfg, cfg.epochs * steps_per_epoch)

    # Resume from the last complete epoch of an identical config.
    start_epoch, history = 0, []
    ckpt_path = out / "last.pt"
    if cfg.resume and ckpt_path.is_file():
        state = ckpt.load(ckpt_path)
        if not isinstance(state.get("config"), dict):
            raise ckpt.CheckpointError(f"checkpoint {str(ckpt_path)!r} has no saved config; "
                                       "choose another out= or set resume=false")
        saved = config_from_dict(state["config"])
        if saved.fingerprint() != cfg.fingerprint():
            diff = [k for k, v in cfg.identity().items() if saved.identity().get(k) != v]
            raise ConfigError(f"out={cfg.out!r} holds a run with a different config "
                              f"({', '.join(diff)}); choose another out= or set resume=false")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            method.load_state_dict(state["method"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            rng = state["rng"][rank] if isinstance(state["rng"], list) else state["rng"]
            start_epoch, history = int(state["epoch"]), list(state["history"])
            ckpt.set_rng_state(rng, {"method": gen})
        except (KeyError, IndexError, TypeError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {str(ckpt_path)!r} is incomplete or does "
                                       f"not match this run ({type(e).__name__}: "
                                       f"{' '.join(str(e).split())[:120]})") from None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out / "config.yaml", dump_yaml(cfg))

    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    logger = RunLogger(out, history, tensorboard=cfg.tensorboard) if is_main else None
    quiet = cfg.quiet or not is_main
    start = time.time()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            train_loader.set_epoch(epoch)
            loss_sum, correct, count = 0.0, 0.0, 0.0
            step_time = 0.0  # seconds in the steps themselves (method, optimizer), no data loading
            bar = progress(train_loader, total=steps_per_epoch, quiet=quiet, unit="step",
                           desc=f"{cfg.progress_desc or cfg.method} {epoch + 1}/{cfg.epochs}")
            for i, (x, y) in enumerate(bar):
                step_start = time.perf_counter()
                lr = lr_at(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    result = method.backward(model, x, y, loss_fn, scaler=scaler, generator=gen)
                loss = float(result.loss)
                if world > 1:  # every rank must see the same verdict, or one would wait forever
                    loss = _dist_sum([loss], device)[0] / world
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at epoch {epoch + 1}, step {i + 1} (lr={lr:.4g}); "
                        f"stopped, {_kept(ckpt_path, epoch)}")
                if cfg.grad_clip is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_time += time.perf_counter() - step_start
                loss_sum += loss * len(y)
                count += len(y)
                if result.logits is not None:
                    correct += float((result.logits.argmax(1) == y).sum())
                if not quiet:
                    bar.set_postfix(loss=f"{loss_sum / count:.4f}",
                                    acc=f"{100 * correct / count:.2f}", refresh=False)
            bar.close()
            loss_sum, correct, count = _dist_sum([loss_sum, correct, count], device)
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr,
                                   "train_loss_running": loss_sum / count,
                                   "train_acc_running": 100.0 * correct / count,
                                   "step_ms": round(1000 * step_time / steps_per_epoch, 3)}
            net = _unwrap(model)
            # Validation after every epoch; train and test every eval_every epochs and last.
            full = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            for split, loader in eval_loaders.items():
                if full or split == "val":
                    loss, acc, top5 = evaluate(net, loader, loss_fn)
                    row[f"{split}_loss"], row[f"{split}_acc"] = loss, acc
                    if math.isfinite(top5):
                        row[f"{split}_top5"] = top5
            if cfg.body_lr is not None:
                row["lr_body"] = lr * cfg.body_lr
            if probe is not None and probe.due(epoch + 1):
                row.update(probe.measure(net))
            row["time_s"] = round(time.time() - start, 3)
            if not all(math.isfinite(v) for k, v in row.items() if k.endswith("loss")):
                raise TrainingDiverged(f"evaluation loss is not finite after epoch {epoch + 1} "
                                       f"(lr={lr:.4g}); stopped, {_kept(ckpt_path, epoch)}")
            history.append(row)
            rngs = [ckpt.rng_state({"method": gen})]
            if world > 1:  # every rank's random state, so a resumed DDP run continues exactly
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, rngs[0])
                rngs = gathered
            if is_main:
                ckpt.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict() if scaler is not None else {},
                           "method": method.state_dict(), "epoch": epoch + 1,
                           "history": history, "config": cfg.to_dict(),
                           "rng": rngs if world > 1 else rngs[0]}, ckpt_path)
                assert logger is not None
                logger.log(row)
            if world > 1:
                dist.barrier()
    finally:
        if logger is not None:
            logger.close()

    net = _unwrap(model)
    final = dict(history[-1]) if history else {}
    metrics: dict[str, Any] = {
        **{k: v for k, v in final.items() if k not in ("lr",)},
        "method": cfg.method, "hparams": cfg.hparams, "seed": cfg.seed,
        "epochs": cfg.epochs, "params": sum(p.numel() for p in net.parameters()),
        "world_size": world, "fingerprint": cfg.fingerprint(), "out": str(out),
        "history": history,
    }
    if world > 1:
        # DDP keeps the replicas identical; record the check so a test can see it.
        flat = torch.cat([p.detach().flatten() for p in net.parameters()]).double()
        spread = flat.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        low = flat.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        metrics["ddp_max_weight_diff"] = float((spread - low).abs().max())
    if is_main:
        ckpt.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics
