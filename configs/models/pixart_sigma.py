"""PixArt-Sigma 1024 (deepcompressor `model/pixart-sigma.yaml`): fp16, 20 steps, guidance 4.5."""


def update(c):
  c.model = "pixart-sigma"
  c.eval.num_prompts = 1024
  c.calib.num_prompts = 128
  c.calib.num_samples = 128
  c.calib.batch_size = 32
  c.calib.max_tokens = 131072   # 128 samples x 4608 tokens would need ~25 GB for the fc2 inputs in f32
