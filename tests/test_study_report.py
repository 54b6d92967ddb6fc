"""The study's report: figures laid out whole and saved by the plots package, mean ± std text."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import torch

import flatminima.plots
from flatminima.experiment import compare
from flatminima.experiment import report as rep
from flatminima.study import report as study_report
from tests.test_study import _one_thread  # noqa: F401  (autouse: one thread per test)

# -- mean ± std -----------------------------------------------------------------------------


def test_fmt_pm_formats_mean_and_std_alike() -> None:
    assert rep.fmt_pm(0.91234, 0.0123) == "0.91 ± 0.01"
    assert rep.fmt_pm(0.91234, 0.0123, 3) == "0.912 ± 0.012"
    assert rep.fmt_pm(1234.5, 56.7, ".0f") == "1234 ± 57"
    assert rep.fmt_pm(0.00123, 0.0004, ".2e") == "1.23e-03 ± 4.00e-04"
    assert rep.fmt_pm(0.5, 0.0) == "0.50 ± 0.00"
    assert rep.fmt_pm(0.5, math.nan, ".3f") == "0.500"            # one value: no spread
    assert rep.fmt_pm(math.nan, 0.1) == "diverged"
    assert rep.fmt_pm(math.inf, 0.1) == "diverged"
    assert rep.fmt_pm(math.nan, math.nan, missing="n/a") == "n/a"


def test_the_tables_format_mean_and_std_with_fmt_pm(monkeypatch) -> None:
    # The study's and the comparison's tables keep their output ...
    assert study_report._ms([0.9, 0.8, 1.0]) == "0.900 ± 0.100"
    assert study_report._ms([0.9, None, math.nan], ".2f") == "0.90"
    assert study_report._ms([None, math.nan]) == "n/a"
    assert study_report._ms([-31.0, -35.0], ".0f") == "-33 ± 3"
    assert compare._ms([0.9, 0.8, 1.0]) == "0.90 ± 0.10"
    assert compare._ms([5.0]) == "5.00 ± 0.00"
    assert compare._ms([0.001, 0.002, math.nan]) == "1.50e-03 ± 7.07e-04"
    assert compare._ms([0.001, 0.002], 4) == "0.0015 ± 0.0007"
    assert compare._ms([math.nan]) == "n/a"
    # ... and both get it from the one formatter.
    calls = []

    def spy(mean, std, digits=2, *, missing="diverged"):
        calls.append((mean, std, digits, missing))
        return "spy"

    monkeypatch.setattr(rep, "fmt_pm", spy)
    monkeypatch.setattr(study_report, "fmt_pm", spy)
    assert study_report._ms([1.0, 3.0], ".1f") == "spy"
    assert compare._ms([1.0, 3.0]) == "spy"
    assert calls == [(2.0, math.sqrt(2.0), ".1f", "n/a"), (2.0, math.sqrt(2.0), ".2f", "diverged")]


# -- figures --------------------------------------------------------------------------------


def _boundary_entries(n: int) -> tuple[list, SimpleNamespace]:
    gen = torch.Generator().manual_seed(0)
    c = np.linspace(-18, 18, 30)
    xx, yy = np.meshgrid(c, c)
    entries = [(f"poison {f:g}" if f else "clean",
                {"grid": {"coords": c.tolist(), "prob": 1 / (1 + np.exp(-(xx + f * yy)))},
                 "train_acc": 1.0, "test_acc": 0.805, "margin_mean": 1.59})
               for f in (0.0, 0.01, 0.03, 0.1, 0.3)[:n]]
    task = SimpleNamespace(x_train=torch.rand(40, 2, generator=gen) * 28 - 14,
                           y_train=torch.randint(0, 2, (40,), generator=gen))
    return entries, task


def _outside(fig) -> list[str]:
    """Text of the figure drawn (partly) outside it: titles, labels, tick labels, legends."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = fig.bbox
    out = []
    for ax in fig.axes:
        texts = [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
        for t in texts:
            if not t.get_visible() or not t.get_text():
                continue
            e = t.get_window_extent(r)
            if e.x0 < box.x0 - 0.5 or e.y0 < box.y0 - 0.5 or e.x1 > box.x1 + 0.5 \
                    or e.y1 > box.y1 + 0.5:
                out.append(t.get_text())
        e = ax.get_tightbbox(r)       # the axes with all it draws: ticks, labels, titles
        if e.x0 < box.x0 - 0.5 or e.y0 < box.y0 - 0.5 or e.x1 > box.x1 + 0.5 \
                or e.y1 > box.y1 + 0.5:
            out.append(f"axes {ax.get_title()!r}")
    return out


def test_boundary_figure_png_has_its_two_line_titles_whole(tmp_path) -> None:
    # The titles were cut at the top edge of the PNG: nothing may touch the image's border.
    entries, task = _boundary_entries(5)
    name = study_report.fig_boundaries(entries, task, tmp_path / "boundaries.png")
    assert name == "boundaries.png" and sorted(p.name for p in tmp_path.iterdir()) == [name]
    img = matplotlib.image.imread(tmp_path / name)[..., :3]
    for edge in (img[:2], img[-2:], img[:, :2], img[:, -2:]):
        assert edge.min() > 0.95, "something is drawn on the image's border (cut off)"


def test_study_figures_are_laid_out_whole_and_saved_by_the_plots_package(monkeypatch,
                                                                          tmp_path) -> None:
    from flatminima.study.pipeline import StudyConfig, run_study
    from flatminima.study.tasks import spirals_task

    saved, problems = [], {}
    real = flatminima.plots.save_figure

    def checked_save(fig, path, **kw):
        problems[path.name] = _outside(fig)
        saved.append(path.name)
        return real(fig, path, **kw)

    monkeypatch.setattr(study_report, "save_figure", checked_save)
    entries, task = _boundary_entries(5)
    study_report.fig_boundaries(entries, task, tmp_path / "boundaries.png")
    task = spirals_task(n_per_class=30)
    cfg = StudyConfig(seeds=(0,), poison_factors=(0.0, 0.5), methods=("baseline", "nrs"),
                      lr_grid=(0.01,), steps=5, cutoffs=(1.0,), num_directions=2,
                      rollout_directions=2, rollout_points=5, grid_resolution=30)
    res = run_study(task, cfg, log=lambda _msg: None)
    study_report.write_report([(res, task, "Two spirals")], tmp_path / "rep", command="test")
    expected = {f"spirals_{s}.png" for s in (
        "data", "boundaries_poison", "rollouts_poison", "radii_poison", "gap_vs_poison",
        "volume_vs_gap", "boundaries_methods", "methods", "rollouts_methods", "radii_methods")}
    assert set(saved) == expected | {"boundaries.png"}
    assert {k: v for k, v in problems.items() if v} == {}
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert files == expected | {"report.md", "results.json"}     # no temporary files left


def test_curves_of_runs_evaluated_every_few_epochs_are_drawn():
    """Test accuracy recorded every 10th epoch (NaN between): the line joins the recorded
    epochs instead of vanishing between NaNs."""
    import math

    from flatminima import plots

    every_tenth = [[math.nan] * 9 + [40.0 + s] for s in range(5)]
    seeds = [sum(every_tenth, []), sum(every_tenth, [])[::-1][::-1]]
    fig = plots.curves({"Baseline": seeds, "empty": [[math.nan] * 50]})
    lines = fig.axes[0].get_lines()
    assert len(lines) == 1  # the all-NaN series is left out
    xs, ys = lines[0].get_data()
    assert list(xs) == [10, 20, 30, 40, 50] and list(ys) == [40, 41, 42, 43, 44]
