"""Baseline: weight-only NF4 g64 (the bitsandbytes/QLoRA W4A16 format)."""


def update(c):
  c.quant.name = "w4a16-nf4"
  c.quant.format = "nf4"
  c.quant.rank = 0
  c.quant.smooth.enabled = False
  c.quant.shift_activations = False
