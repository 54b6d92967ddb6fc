"""Fixed text of the study report: what is measured, how, and where the protocol departs from
the paper's (Huang et al. 2019, "Understanding Generalization through Visualizations").

Everything numeric in the report is computed from the run; this module only states the protocol.
"""

from __future__ import annotations

PREAMBLE: tuple[str, ...] = (
    "Huang et al. (2019) argue that well-generalizing networks sit in wide-margin, flat, "
    "high-volume minima, and show it by *poisoning*: a term that rewards wrong answers on unseen "
    "points of the data distribution drives the same network to a minimum that fits the training "
    "set just as well but generalizes badly, with a boundary hugging every training point and a "
    "basin orders of magnitude smaller. This report repeats that experiment and measures the "
    "library's flat-minima methods the same way.",
    "",
    "**Protocol.**",
    "",
    "- *Data.* Two spirals: angle `theta = sqrt(v) * 600°`, `v ~ U(0,1)`, point "
    "`1.5 theta (-cos theta, sin theta)` plus Gaussian noise, class 1 the mirror image of class 0 "
    "(`flatminima.data.spirals.make_spirals`); 400 points split half/half into train and test, "
    "as in the paper. The last quarter of the training half is the validation split used only to "
    "tune learning rates. MNIST: a class-balanced subset of the training digits; the test digits "
    "are scored.",
    "- *Poison.* Loss = mean cross-entropy on the training set + `factor` × mean reverse "
    "cross-entropy `-log(1 - p_y)` on a separate draw of unseen points from the same "
    "distribution (spirals: a second draw of the generator; MNIST: held-out training digits, as "
    "the paper poisons SVHN with its `extra` split). For two classes the reverse cross-entropy "
    "*is* the cross-entropy with flipped labels, the paper's toy setting; for ten classes it only "
    "asks the model to be wrong instead of fitting arbitrary wrong labels, as the paper's SVHN "
    "code does. Factor 0 is the clean model.",
    "- *Training.* Full batch, Adam with a cosine-decayed learning rate and gradient clipping at "
    "norm 8 (the paper: Adam, clipping 8, 40,000 epochs with step decays). Every method "
    "(`flatminima.methods`) computes the gradient; poisoned models use Baseline.",
    "- *Fair comparison.* Each method's learning rate is chosen from one shared grid by "
    "validation accuracy (models trained on the rest of the training set), then the final models "
    "are trained on the whole training set at that rate, one per seed; results are mean ± std "
    "over seeds. Poisoned models use Baseline's tuned rate.",
    "- *Geometry.* All measured on the *clean* training loss. Rollouts and the basin radius use "
    "random filter-normalized directions (Li et al. 2018; `t` is a relative step, so models of "
    "different weight scale compare): the radius along a direction is where the train loss first "
    "crosses the cutoff (`flatminima.volume.basin_radius`). The log-volume uses isotropic "
    "directions in the full weight space, `log V_n + log mean r^n` "
    "(`flatminima.volume.log_volume_from_radii`), reported in base 10 with a bootstrap error. "
    "The input margin of a training point is its distance to the decision boundary (negative if "
    "misclassified), on a 400×400 grid over [-18, 18]².",
    "",
    "**Departures from the paper by construction.** Far fewer steps (minutes on a CPU instead of "
    "40,000 epochs), so poisoned models may stop just short of 100% train accuracy; a fixed poison "
    "set instead of a fresh draw every epoch; a constant poison factor instead of the paper's "
    "schedule that doubles it twice; two softmax outputs instead of one sigmoid output (the same "
    "objective); an MLP on an MNIST subset instead of a ResNet-18 on SVHN.",
    "",
)

__all__ = ["PREAMBLE"]
