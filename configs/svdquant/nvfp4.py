"""SVDQuant NVFP4 (deepcompressor `svdquant/nvfp4.yaml`): E2M1 g16 with FP8 scales, no GELU shift."""


def update(c):
  c.quant.name = "svdq-nvfp4"
  c.quant.format = "nvfp4"
  c.quant.rank = 32
  c.quant.smooth.enabled = True
  c.quant.shift_activations = False
