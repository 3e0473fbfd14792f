"""SVDQuant INT4 (deepcompressor `svdquant/int4.yaml`): W4A4 g64, smoothing, rank-32 branch, GELU shift."""


def update(c):
  c.quant.name = "svdq-int4"
  c.quant.format = "int4"
  c.quant.rank = 32
  c.quant.smooth.enabled = True
  c.quant.shift_activations = True
