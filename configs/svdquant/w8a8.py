"""SVDQuant W8A8: INT8 per-channel weights, per-token activations, smoothing, rank-16 branch.

The original repository ships no W8A8 config; the paper's rank 16 is used here (spec §1.7).
"""


def update(c):
  c.quant.name = "svdq-w8a8"
  c.quant.format = "w8a8"
  c.quant.rank = 16
  c.quant.smooth.enabled = True
  c.quant.shift_activations = False
