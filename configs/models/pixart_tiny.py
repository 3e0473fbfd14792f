"""pixart-tiny: PixArt-Sigma architecture at small width, deterministic weights."""


def update(c):
  c.model = "pixart-tiny"
  c.eval.num_prompts = 8
  c.calib.num_prompts = 16
  c.calib.num_samples = 32
  c.calib.batch_size = 8
