"""Baseline: naive NVFP4 (no smoothing, no low-rank branch)."""


def update(c):
  c.quant.name = "rtn-nvfp4"
  c.quant.format = "nvfp4"
  c.quant.rank = 0
  c.quant.smooth.enabled = False
  c.quant.shift_activations = False
