"""Baseline: weight-only INT4 g64 (W4A16), activations stay 16-bit."""


def update(c):
  c.quant.name = "w4a16-int4"
  c.quant.format = "w4a16"
  c.quant.rank = 0
  c.quant.smooth.enabled = False
  c.quant.shift_activations = False
