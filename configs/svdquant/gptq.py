"""GPTQ on the residual after the low-rank branch (deepcompressor `svdquant/gptq.yaml`)."""


def update(c):
  c.quant.gptq.enabled = True
  c.quant.gptq.damp = 0.01
  c.quant.gptq.block_size = 128
  c.quant.gptq.num_inv_tries = 250
  c.quant.name = c.quant.name + "-gptq"
