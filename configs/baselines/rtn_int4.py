"""Baseline: naive W4A4 INT4 g64 round-to-nearest (no smoothing, no low-rank branch)."""


def update(c):
  c.quant.name = "rtn-int4"
  c.quant.format = "int4"
  c.quant.rank = 0
  c.quant.smooth.enabled = False
  c.quant.shift_activations = True
