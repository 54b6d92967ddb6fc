"""One ``flatminima.experiment.train`` epoch against a plain hand-written loop, side by side; the
short CIFAR-subset run before and after the evaluation changes; JPEG decoding before and after.

    python benchmarks/train_epoch.py [--quick] [--rounds 3] [--only epoch,run,decode]
                                     [--methods baseline,nrs]

Data: CIFAR-10 (JPEG) from ``../shared/data/cifar10-jpeg.tar.gz`` (decoded once into the cache
``$FLATMINIMA_CACHE``, default ``/tmp/flatminima-cache``), 500 training images per class
(``subset_per_class=500``), ``val_split=0.1``, ``augment=basic``, the small CNN, batch 128,
SGD lr 0.1 momentum 0.9, one thread: the issue's reproduction run. Where the archive is absent
the generated ``synthetic_images`` set stands in (the report says which).

* ``epoch``: ``train`` runs ``E`` epochs with ``eval_every=E`` (so epochs ``1..E-1`` evaluate the
  validation split only, as every epoch between two full evaluations does); the time of each of
  those epochs (from the start of one epoch to the start of the next: training steps, the
  validation pass, the checkpoint, metrics.csv, TensorBoard, the progress bar) is set against an
  epoch of a hand-written loop over the same model, the same training tensors (decoded, on the
  device), the same augmentation, batch size, optimizer and method: shuffle, index, augment,
  ``method.backward(model, x, y)``, ``opt.step()``, ``opt.zero_grad()``, nothing else. The two
  alternate (the order reversed every other round); medians over all epochs of all rounds. The
  last epoch of the ``train`` run, which also evaluates the full training and test sets, is what
  every epoch costs with ``eval_every=1``.
* ``run``: the whole short run (``train(cfg)``, data from the cache, evaluation and all) as it
  was (every epoch evaluated, evaluation batch 1000 in NCHW, emulated through
  ``CPU_EVAL_BATCH``/``CPU_EVAL_CHANNELS_LAST``), as it is now with ``eval_every=1``, and with
  ``eval_every=epochs``; alternating rounds, medians; the final metrics of all three compared.
* ``decode``: decoding the 60,000 JPEGs of the extracted tree one task per image (as before) and
  one contiguous slice per thread (now), alternating; loading the decoded-array cache.

Times are CPU seconds of the process (``time.process_time``; wall seconds beside them): the
machine is shared, and wall time measures the neighbours' load as much as the code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _fixtures import (  # before flatminima: puts this checkout on sys.path
    RESULTS,
    SHARED_DATA,
    load_results,
    machine,
    rewrite_report,
    save_results,
    utc_date,
)

from flatminima.data import DeviceLoader, make_augment
from flatminima.data import imagefolder as imf
from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.config import load_config
from flatminima.experiment.logs import RunLogger
from flatminima.methods import create_method
from flatminima.models import create_model

T = importlib.import_module("flatminima.experiment.train")  # the module, not the function

ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
METHODS = {"baseline": [], "nrs": ["rho=0.05", "alpha=1.0"]}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def base_overrides(quick: bool) -> tuple[list[str], str]:
    if ARCHIVE.is_file():
        per_class = 100 if quick else 500
        return (["dataset=cifar10-jpeg", f"data_root={SHARED_DATA}",
                 f"subset_per_class={per_class}"],
                f"CIFAR-10 (JPEG), {per_class} training images per class")
    return (["dataset=synthetic_images"], "synthetic_images (the CIFAR-10 JPEG archive is absent)")


def make_cfg(data: list[str], method: str, epochs: int, out: Path, *extra: str):
    return load_config(None, [*data, "model=cnn", "augment=basic", "val_split=0.1",
                              "threads=1", "batch_size=128", "lr=0.1", "momentum=0.9",
                              f"method={method}", *METHODS[method], f"epochs={epochs}",
                              f"out={out}", "resume=false", *extra])


def now() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


@contextlib.contextmanager
def instrumented():
    """Marks at the start of every training epoch and after every log call, and the time spent
    in evaluation, checkpoints and logging, by patching those four functions."""
    rec = {"start": [], "end": [], "eval": 0.0, "save": 0.0, "log": 0.0, "per_epoch": []}
    set_epoch, evaluate, save, log = (DeviceLoader.set_epoch, T.evaluate, ckpt.save,
                                      RunLogger.log)

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                rec[key] += time.process_time() - t0
        return wrapper

    def on_epoch(self, epoch):
        if self.shuffle:  # the training loader; evaluation loaders never call it
            rec["start"].append(now())
            rec["per_epoch"].append({k: rec[k] for k in ("eval", "save", "log")})
        return set_epoch(self, epoch)

    def on_log(self, row):
        out = log_timed(self, row)
        rec["end"].append(now())
        return out

    log_timed = timed("log", log)
    DeviceLoader.set_epoch = on_epoch
    T.evaluate = timed("eval", evaluate)
    ckpt.save = timed("save", save)
    RunLogger.log = on_log
    try:
        yield rec
    finally:
        DeviceLoader.set_epoch, T.evaluate, ckpt.save, RunLogger.log = (set_epoch, evaluate,
                                                                        save, log)


def quiet_stderr():
    return contextlib.redirect_stderr(io.StringIO())


# --- one epoch: train against the plain loop ------------------------------------------------------
def train_epochs(cfg) -> list[dict]:
    """Per epoch of a ``train`` run: CPU and wall seconds, and the parts in evaluation,
    checkpointing and logging (CPU)."""
    with instrumented() as rec, quiet_stderr():
        T.train(cfg)
    marks = rec["start"] + [rec["end"][-1]]
    parts = rec["per_epoch"] + [{k: rec[k] for k in ("eval", "save", "log")}]
    return [{"cpu": marks[i + 1][0] - marks[i][0], "wall": marks[i + 1][1] - marks[i][1],
             **{k: parts[i + 1][k] - parts[i][k] for k in ("eval", "save", "log")}}
            for i in range(len(marks) - 1)]


def plain_epochs(cfg, epochs: int) -> list[dict]:
    """The hand-written loop: the same model, training tensors, augmentation, batch size,
    optimizer and method as ``train`` (what ``build_data`` gives it), nothing else."""
    torch.set_num_threads(1)
    d = T.build_data(cfg)
    x, y = d["train"]
    mean, std = d["data"].mean, d["data"].std
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=d["data"].num_classes,
                         input_shape=tuple(d["data"].input_shape))
    method = create_method(cfg.method, **cfg.hparams)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    augment = make_augment(cfg.augment)
    g_data, g_method = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    out = []
    for _ in range(epochs):
        t0 = now()
        model.train()
        perm = torch.randperm(len(y), generator=g_data)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = augment(x[idx], mean, std, g_data)
            method.backward(model, xb, y[idx], generator=g_method)
            opt.step()
            opt.zero_grad(set_to_none=True)
        t1 = now()
        out.append({"cpu": t1[0] - t0[0], "wall": t1[1] - t0[1]})
    return out


def measure_epoch(data: list[str], method: str, epochs: int, rounds: int, tmp: Path) -> dict:
    runs, plains = [], []
    for r in range(rounds):
        for side in (("train", "plain") if r % 2 == 0 else ("plain", "train")):
            cfg = make_cfg(data, method, epochs, tmp / f"epoch-{method}-{r}",
                           f"eval_every={epochs}")
            if side == "train":
                runs.append(train_epochs(cfg))
            else:
                plains.append(plain_epochs(cfg, epochs - 1))
            print(f"  {method} round {r + 1} {side}: "
                  + " ".join(f"{e['cpu']:.2f}" for e in (runs if side == "train"
                                                          else plains)[-1]), flush=True)
    between = [e for run in runs for e in run[:-1]]
    full = [run[-1] for run in runs]
    plain = [e for p in plains for e in p]

    def med(rows, key):
        return statistics.median(row[key] for row in rows)

    res = {"method": method, "epochs_per_run": epochs, "rounds": rounds,
           "train_epoch_cpu": med(between, "cpu"), "train_epoch_wall": med(between, "wall"),
           "plain_epoch_cpu": med(plain, "cpu"), "plain_epoch_wall": med(plain, "wall"),
           "val_eval_cpu": med(between, "eval"), "checkpoint_cpu": med(between, "save"),
           "log_cpu": med(between, "log"),
           "full_eval_epoch_cpu": med(full, "cpu"), "full_eval_cpu": med(full, "eval"),
           "raw": {"train": runs, "plain": plains}}
    res["ratio_cpu"] = res["train_epoch_cpu"] / res["plain_epoch_cpu"]
    res["ratio_wall"] = res["train_epoch_wall"] / res["plain_epoch_wall"]
    res["full_eval_ratio_cpu"] = res["full_eval_epoch_cpu"] / res["plain_epoch_cpu"]
    return res


# --- the whole short run, before and after --------------------------------------------------------
RUN_VARIANTS = {
    # Evaluation as it was: every epoch, batches of eval_batch_size (1000), NCHW.
    "before (eval every epoch, batch 1000 NCHW)": ({"CPU_EVAL_BATCH": 10**9,
                                                    "CPU_EVAL_CHANNELS_LAST": False}, 1),
    "now, eval_every=1": ({}, 1),
    "now, eval_every=epochs": ({}, None),
}


def measure_run(data: list[str], method: str, epochs: int, rounds: int, tmp: Path) -> dict:
    times: dict[str, list] = {k: [] for k in RUN_VARIANTS}
    finals: dict[str, dict] = {}
    defaults = {k: getattr(T, k) for k in ("CPU_EVAL_BATCH", "CPU_EVAL_CHANNELS_LAST")}
    names = list(RUN_VARIANTS)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            consts, every = RUN_VARIANTS[name]
            cfg = make_cfg(data, method, epochs, tmp / f"run-{r}-{names.index(name)}",
                           f"eval_every={every or epochs}")
            T._dataset.cache_clear()  # every run reads the data (from the decoded cache)
            for k, v in consts.items():
                setattr(T, k, v)
            try:
                t0 = now()
                with instrumented() as rec, quiet_stderr():
                    m = T.train(cfg)
                t1 = now()
            finally:
                for k, v in defaults.items():
                    setattr(T, k, v)
            times[name].append({"cpu": t1[0] - t0[0], "wall": t1[1] - t0[1],
                                "eval": rec["eval"], "save": rec["save"], "log": rec["log"],
                                "setup": rec["start"][0][0] - t0[0]})
            finals[name] = {k: m[k] for k in ("train_acc", "val_acc", "test_acc", "train_loss",
                                              "val_loss", "test_loss")}
            print(f"  run {name} round {r + 1}: {t1[0] - t0[0]:.1f} s CPU", flush=True)
    out = {"method": method, "epochs": epochs, "rounds": rounds, "variants": {}}
    for name, rows in times.items():
        out["variants"][name] = {k: statistics.median(row[k] for row in rows)
                                 for k in rows[0]} | {"final": finals[name], "raw": rows}
    return out


# --- JPEG decoding -------------------------------------------------------------------------------
def decode_before(paths, num_threads: int = 2) -> np.ndarray:
    """The decoding loop as it was: one thread-pool task per image, then ``np.stack``."""
    with ThreadPoolExecutor(num_threads) as pool:
        arrays = list(pool.map(imf.decode_image, paths, chunksize=256))
    return np.stack(arrays)


def measure_decode(rounds: int, quick: bool) -> dict | None:
    if not ARCHIVE.is_file():
        return None
    cache_root = imf.default_cache_dir(SHARED_DATA)
    tree, _ = imf._resolve_tree(SHARED_DATA, ARCHIVE.name, None)
    _, tr, _, te, _ = imf._list_tree(tree)
    paths = (tr + te)[: 6000 if quick else None]
    times: dict[str, list] = {"before: one task per image": [], "now: one slice per thread": []}
    for r in range(rounds):
        for name in (list(times) if r % 2 == 0 else list(times)[::-1]):
            t0 = now()
            arr = (decode_before(paths) if name.startswith("before")
                   else imf._decode_all(paths, "RGB", None, None, 2))
            t1 = now()
            times[name].append({"cpu": t1[0] - t0[0], "wall": t1[1] - t0[1]})
            print(f"  decode {name} round {r + 1}: {t1[1] - t0[1]:.1f} s wall", flush=True)
            if name.startswith("before"):
                ref = arr
            else:
                new = arr
    cache = sorted(cache_root.glob(".cifar10-jpeg-*.npz"), key=lambda p: p.stat().st_mtime)
    load = []
    for _ in range(rounds):
        t0 = now()
        imf._read_cache(cache[-1])
        t1 = now()
        load.append({"cpu": t1[0] - t0[0], "wall": t1[1] - t0[1]})
    ex = Path(tempfile.mkdtemp(prefix="extract-"))
    try:
        t0 = now()
        imf.safe_extract(ARCHIVE, ex)
        t1 = now()
    finally:
        shutil.rmtree(ex, ignore_errors=True)
    out = {"images": len(paths), "identical": bool(np.array_equal(ref, new)),
           "extract": {"cpu": t1[0] - t0[0], "wall": t1[1] - t0[1]}, "variants": {}}
    for name, rows in list(times.items()) + [("cache load", load)]:
        out["variants"][name] = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    return out


# --- report ---------------------------------------------------------------------------------------
def report(res: dict) -> str:
    env = res["env"]
    lines = [
        "# A `train` epoch against a plain hand-written loop; the short CIFAR-subset run",
        "",
        f"Machine: {env['cpu_model']} ({env['machine']}), {env['cpus']} CPUs visible (shared "
        f"with other jobs), torch {env['torch']} (1 thread), Python {env['python']}. Data: "
        f"{env['data']}; small CNN (`model=cnn`), batch 128, `augment=basic`, `val_split=0.1`, "
        f"SGD lr 0.1 momentum 0.9, `threads=1`. CPU seconds of the process "
        "(`time.process_time`; wall seconds in the JSON), medians of alternating rounds. "
        f"Generated by `benchmarks/train_epoch.py` on {env['date']}.",
    ]
    if res.get("epoch"):
        lines += [
            "",
            "## One epoch: `train` against the plain loop",
            "",
            "`train` epochs between two full evaluations (`eval_every` > 1: training steps, the "
            "validation pass, checkpoint, metrics.csv, TensorBoard, progress bar) against an "
            "epoch of the hand-written loop (shuffle, index, augment, `method.backward`, "
            "`opt.step`, `opt.zero_grad`) over the same model, training tensors, batch size, "
            "optimizer and method. The last column is an epoch that also evaluates the full "
            "training and test sets, what every epoch costs with `eval_every=1`.",
            "",
            "| method | plain loop (s) | `train` epoch (s) | ratio | of which validation / "
            "checkpoint / logs (s) | wall ratio | epoch with full evaluation (s, ratio) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["epoch"]:
            lines.append(
                f"| {r['method']} | {r['plain_epoch_cpu']:.2f} | {r['train_epoch_cpu']:.2f} | "
                f"**{r['ratio_cpu']:.3f}x** | {r['val_eval_cpu']:.2f} / "
                f"{r['checkpoint_cpu']:.3f} / {r['log_cpu']:.3f} | {r['ratio_wall']:.3f}x | "
                f"{r['full_eval_epoch_cpu']:.2f} ({r['full_eval_ratio_cpu']:.2f}x; evaluation "
                f"{r['full_eval_cpu']:.2f}) |")
        r0 = res["epoch"][0]
        rounds = ", ".join(f"{r['rounds']} for {r['method']}" for r in res["epoch"])
        lines += ["", f"Rounds ({rounds}) of a {r0['epochs_per_run']}-epoch `train` run "
                  f"({r0['epochs_per_run'] - 1} epochs between evaluations) and a "
                  f"{r0['epochs_per_run'] - 1}-epoch plain loop each. A ratio below 1 is no "
                  "real speed-up but the spread of a shared machine (other jobs kept its load "
                  "at 3-4 on 2 cores): the `train` epoch runs the same steps plus its per-step "
                  "bookkeeping, the validation pass and one checkpoint.",
                  "",
                  "The target (a `train` epoch at most 1.1x the plain loop) holds for the "
                  "epochs that evaluate the validation split only. An epoch that evaluates "
                  "the full training and test sets as well (every epoch with `eval_every=1`, "
                  "the default, which `compare`'s test-accuracy curves need) costs what those "
                  "15,000 forward passes cost; that is the evaluation asked for, not overhead, "
                  "and `eval_every=N` pays it every N epochs and after the last."]
    if res.get("run"):
        run = res["run"]
        lines += [
            "",
            f"## The whole short run ({run['method']}, {run['epochs']} epochs), before and "
            "after",
            "",
            "`train(cfg)` from call to return, the decoded data read from its cache. *Before*: "
            "the evaluation as it was (every epoch, the full training, validation and test "
            "sets, batches of `eval_batch_size=1000` in NCHW; emulated on the current code "
            "by setting `CPU_EVAL_BATCH` and `CPU_EVAL_CHANNELS_LAST` back, which differs from "
            "the old evaluation only in summing the losses in float64 on the device). The "
            "first run in the process (a *before* one) also pays one-off imports in its setup.",
            "",
            "| variant | total (s) | evaluation (s) | setup: data, model, TensorBoard (s) | "
            "checkpoints + logs (s) | "
            "speed-up | final train / val / test accuracy (%) |",
            "|---|---|---|---|---|---|---|",
        ]
        before = next(iter(run["variants"].values()))["cpu"]
        for name, v in run["variants"].items():
            f = v["final"]
            lines.append(
                f"| {name} | {v['cpu']:.1f} | {v['eval']:.1f} | {v['setup']:.2f} | "
                f"{v['save'] + v['log']:.2f} | {before / v['cpu']:.2f}x | "
                f"{f['train_acc']:.2f} / {f['val_acc']:.2f} / {f['test_acc']:.2f} |")
        finals = [v["final"] for v in run["variants"].values()]
        same = all(f == finals[1] for f in finals[1:])
        lines += ["", "The final metrics of the two `eval_every` settings are "
                  + ("identical." if same else "NOT identical.")
                  + " Against *before* the accuracies are "
                  + ("identical" if all(f[k] == finals[0][k] for f in finals
                                        for k in ("train_acc", "val_acc", "test_acc"))
                     else "different")
                  + "; the losses differ by at most "
                  + f"{max(abs(f[k] - finals[0][k]) for f in finals for k in f if 'loss' in k):.1e}"
                  + " (the channels-last convolutions sum in another order)."]
    if res.get("decode"):
        dec = res["decode"]
        v = dec["variants"]
        b, n = v["before: one task per image"], v["now: one slice per thread"]
        lines += [
            "",
            "## Decoding the JPEG tree (a cache miss; 2 threads)",
            "",
            "| step | CPU (s) | wall (s) |",
            "|---|---|---|",
            f"| extract the archive (60,000 files) | {dec['extract']['cpu']:.1f} | "
            f"{dec['extract']['wall']:.1f} |",
        ]
        lines += [f"| {name} ({dec['images'] if 'cache' not in name else 60000:,} images) | "
                  f"{row['cpu']:.1f} | {row['wall']:.1f} |" for name, row in v.items()]
        lines += ["", f"Decoded arrays identical: {dec['identical']}; decoding "
                  f"{b['wall'] / n['wall']:.2f}x faster (wall). The decoded arrays are cached "
                  "(keyed by the archive's size and time stamp), so this is paid once per "
                  "archive and cache folder; a cache hit needs no extracted tree."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 images per class, 1 round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--only", default="epoch,run,decode", help="sections, comma-separated")
    ap.add_argument("--methods", default="baseline,nrs")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other sections (and methods) of the stored results")
    ap.add_argument("--from-json", action="store_true",
                    help="rewrite the report from the stored JSON without measuring")
    args = ap.parse_args()
    if args.from_json:
        return rewrite_report("train_epoch", report)
    os.environ.setdefault("FLATMINIMA_CACHE", "/tmp/flatminima-cache")
    torch.set_num_threads(1)
    rounds = args.rounds or (1 if args.quick else 3)
    data, data_name = base_overrides(args.quick)
    sections = set(args.only.split(","))
    res = (load_results("train_epoch") if args.merge and (RESULTS / "train_epoch.json").is_file()
           else {})
    res["env"] = {"machine": machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "threads": 1,
                  "python": platform.python_version(), "data": data_name, "date": utc_date()}
    tmp = Path(tempfile.mkdtemp(prefix="train-epoch-"))
    try:
        if "epoch" in sections:
            new = {m: measure_epoch(data, m, 3, rounds, tmp) for m in args.methods.split(",")}
            kept = [r for r in res.get("epoch", []) if r["method"] not in new]
            res["epoch"] = kept + list(new.values())
        if "run" in sections:
            res["run"] = measure_run(data, "baseline", 3, max(1, rounds - 1), tmp)
        if "decode" in sections:
            res["decode"] = measure_decode(max(1, rounds - 1), args.quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(res)
    print(text)
    if not args.quick:
        save_results("train_epoch", res, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
