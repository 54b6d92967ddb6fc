"""The sections of ``benchmarks/hessian.py``, one module each: its measurement and, next to it,
the function that writes its part of ``benchmarks/results/hessian.md`` from the stored JSON.

Section 1 (Hessian-vector products): :mod:`.hvp`, :mod:`.allocators`,
:mod:`.small_activations`, :mod:`.norm_folding`. Section 2 (top eigenvalues): :mod:`.eigen`
(2a-2f), :mod:`.clusters` (2g), :mod:`.start` (2j), :mod:`.cifar` (2h-2i). Section 3:
:mod:`.trace`. Section 4: :mod:`.memory`. :mod:`.targets` checks the project's targets against
all of them; :mod:`.pyhessian_adapter` holds what talks to PyHessian (an optional import).
"""
