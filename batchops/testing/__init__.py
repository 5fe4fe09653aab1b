"""Test helpers for code that uses batchops (pure Python; no compiled kernels needed).

* :func:`run_ranks` -- run a function on N ``torch.distributed`` ranks as independent processes
  with a hard timeout, and get every rank's value, traceback or exit status back
  (:class:`RankResult`); :class:`RankFailure` when ``check=True`` and a rank failed.
"""

from batchops.testing.distributed import RankFailure, RankResult, run_ranks

__all__ = ["RankFailure", "RankResult", "run_ranks"]
