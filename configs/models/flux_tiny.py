"""flux-tiny: the built-in default (real FLUX.1 architecture at small width, deterministic weights)."""


def update(c):
  c.model = "flux-tiny"
  c.eval.num_prompts = 8
  c.calib.num_prompts = 16
  c.calib.num_samples = 32
  c.calib.batch_size = 8
