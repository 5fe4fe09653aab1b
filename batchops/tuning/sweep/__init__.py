"""Convergence study: train one model at several batch sizes and compare how fast each learns.

`batch_size_sweep` trains the same model, from the same initial weights and on the same stream
of samples, once per batch size (with the learning rate scaled by a rule), and records:

* per step: the mini-batch training loss, the samples seen so far, the learning rate and the
  training wall time (evaluation and noise-scale measurements are kept off that clock);
* per evaluation point: the loss on a fixed subset of the training set and the test loss and
  accuracy, all in eval mode (evaluation points lie on a grid of samples seen, the same for every
  batch size, plus the steps 1, 2, 4, 8, ...);
* the throughput (training samples per second: the batch size over the median step time);
* the gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical
  Model of Large-Batch Training", appendix A): every few steps the batch is split into two halves,
  the gradient of each half is computed, and the unbiased two-batch estimators of |G|^2 and
  tr(Sigma) are fed from the halves' squared norms (batch B/2) and their mean's (batch B). The
  two estimates are smoothed with an exponential moving average and B_simple is their ratio.

A target loss (on the training subset; by default the loosest loss every run reached within half
its samples) then gives, per batch size, the steps, samples and time to reach it. The steps S and samples
E = S * B to reach the target should follow McCandlish's trade-off curve
(S / S_min - 1) * (E / E_min - 1) = 1, i.e. S = S_min * (1 + B_crit / B); the sweep fits S_min and
B_crit = E_min / S_min by least squares on S = S_min + E_min / B and marks both the fitted B_crit
and the measured noise scale on the plots. (The theory assumes a learning rate tuned per batch
size; a fixed rule such as sqrt scaling is an approximation of that.)

With `out_dir`, the sweep writes PNG plots (matplotlib, Agg canvas, no display), `report.md`
(a table per batch size with the images embedded) and `sweep.json` (every raw record).
`batchops sweep` on the command line runs the default study (see batchops/cli.py).

One job per module:

* study.py -- `batch_size_sweep` and the training run of each batch size (losses, throughput,
  noise-scale measurements);
* inputs.py -- the default data set and model, the learning-rate rule, the shared sample order
  and batching;
* results.py -- `RunResult` and `SweepResult`, with their table and headline;
* analysis.py -- the target loss, the crossing of each run, the trade-off fit;
* report.py -- `write_outputs`: report.md and sweep.json; plots.py draws the figures.
"""

from batchops.tuning.sweep.inputs import LR_RULES, SPLIT_SEED, default_model, load_digits_dataset, lr_for, sample_stream
from batchops.tuning.sweep.report import DEFAULT_OUT_DIR, JSON_FILE, PLOT_FILES, REPORT_FILE, write_outputs
from batchops.tuning.sweep.results import RunResult, SweepResult
from batchops.tuning.sweep.study import (
    DEFAULT_BASE_LR,
    DEFAULT_BATCH_SIZES,
    DEFAULT_EPOCHS,
    OPTIMIZERS,
    batch_size_sweep,
)

__all__ = [
    "DEFAULT_OUT_DIR",
    "DEFAULT_BATCH_SIZES",
    "LR_RULES",
    "OPTIMIZERS",
    "DEFAULT_BASE_LR",
    "DEFAULT_EPOCHS",
    "SPLIT_SEED",
    "PLOT_FILES",
    "REPORT_FILE",
    "JSON_FILE",
    "load_digits_dataset",
    "default_model",
    "lr_for",
    "sample_stream",
    "RunResult",
    "SweepResult",
    "batch_size_sweep",
    "write_outputs",
]
