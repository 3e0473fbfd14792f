"""Baseline: naive W8A8 (INT8 per-channel weights, per-token activations, no smoothing/branch)."""


def update(c):
  c.quant.name = "rtn-w8a8"
  c.quant.format = "w8a8"
  c.quant.rank = 0
  c.quant.smooth.enabled = False
  c.quant.shift_activations = False
