"""The KL divergence between two models' predicted class distributions, from their logits.

Used by NRS (its training objective) and by :mod:`flatminima.divergence` (the measurement), so it
lives below both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(softmax(p) || softmax(q))`` summed over the last dim, averaged over the rest.

    The model divergence of Zhao & Zhang (2022), Definition 1, for one batch::

        D = mean_x sum_c p_c(x) (log p_c(x) - log q_c(x)),   p = softmax(logits_p), q = ...

    The inputs must be logits (unnormalized log-probabilities) over classes in the last
    dimension. Low-precision outputs (autocast) are upcast: the KL of nearby distributions is a
    small difference of logs that float16 cannot resolve.
    """
    logp = F.log_softmax(_upcast(logits_p), dim=-1)
    logq = F.log_softmax(_upcast(logits_q), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1).mean()


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
