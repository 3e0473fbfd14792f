"""Faster calibration (deepcompressor `svdquant/fast.yaml`): 19 smoothing candidates, 64 samples."""


def update(c):
  c.quant.smooth.num_grids = 10
  c.calib.num_samples = min(c.calib.num_samples, 64)
  c.quant.name = c.quant.name + "-fast"
