"""Exact and synthetic studies of the GSIL estimators (no model, no trainer needed).

- :mod:`analysis.gradients`: losses, gradient weights, demo/gen balance, summary table.
- :mod:`analysis.calibration`: population links, classifier metrics (AUC, ECE, reliability),
  ``calibrate_run(run_dir)`` on ``implicit_logits.jsonl``.
- :mod:`analysis.ratio_fit`: finite-sample density-ratio fits on Gaussians and categoricals.
- :mod:`analysis.toy`: the exact enumerable testbed (tabular autoregressive policy, rounds).
- :mod:`analysis.toy_sweeps`: sweeps over methods, beta, shift and rounds on the testbed.
"""
