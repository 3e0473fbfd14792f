"""FLUX.1-schnell (deepcompressor `model/flux.1-schnell.yaml`): bf16, 4 steps, no guidance, 1024^2."""


def update(c):
  c.model = "flux-schnell"
  c.eval.num_prompts = 1024
  c.calib.num_prompts = 128
  c.calib.num_samples = 128
  c.calib.batch_size = 32
