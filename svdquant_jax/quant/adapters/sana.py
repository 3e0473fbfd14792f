"""SANA: 20 blocks (at 1.6B) of linear self-attention, cross-attention to Gemma-2 and a GLUMBConv.

Policy (deepcompressor's SANA-1.6B config: "as PixArt, plus the GLUMBConv 1x1 convs"): the
self-attention q/k/v and output, the cross-attention query and output, and the GLUMBConv's two
1x1 convolutions (``ff/conv_inverted``, ``ff/conv_point``, linear layers here) are W4A4; the
cross-attention K/V read Gemma features and stay 16-bit, as do the patch embedding, adaLN-single,
the caption projection and norm, the 3x3 depthwise ``ff/conv_depth`` and the output head.

Where the GLU output is quantized: ``conv_point`` reads ``h * SiLU(g)`` (``[h, g]`` the two halves
of the depthwise conv output), computed in the model dtype; that product is the activation the
INT4 / NVFP4 quantizer sees, per token and 64- (16-) channel group, after smoothing. Its sign:
unlike the GELU output of PixArt's ``fc2`` input (bounded below by -0.17, hence shifted and
quantized unsigned), ``h`` is unbounded in both directions, so ``h * SiLU(g)`` is too; the group
is not ``unsigned`` and the input is quantized signed and symmetric (INT4 in [-7, 7]), with no
shift. ``conv_inverted`` reads the modulated LayerNorm output (signed) as every other input.
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn

from svdquant_jax.models import sana as sana_lib
from svdquant_jax.quant.adapters.base import BlockPolicy, BlockRef, LinearGroup
from svdquant_jax.quant.adapters.pixart import PixArtAdapter

BLOCK = BlockPolicy(
    kind="sana",
    groups=(
        LinearGroup("qkv", ("attn1/to_qkv",), eval_module="attn1"),
        LinearGroup("out", ("attn1/to_out",)),
        LinearGroup("cross_q", ("attn2/to_q",), eval_module="attn2"),
        LinearGroup("cross_out", ("attn2/to_out",)),
        LinearGroup("ff.conv_inverted", ("ff/conv_inverted",)),
        LinearGroup("ff.conv_point", ("ff/conv_point",)),   # signed GLU product: no shift (module doc)
    ),
)


@dataclasses.dataclass(frozen=True)
class SanaAdapter(PixArtAdapter):
  """:class:`~svdquant_jax.models.sana.SanaTransformer2DModel` block by block.

  The state and its hand-over are PixArt's (image tokens, caption tokens, timestep embedding,
  optional caption mask); the state carries the image tokens on their patch grid
  (``hidden_states [S, h, w, D]``), so a block needs no static height and width.
  """
  config: sana_lib.SanaConfig

  family = "sana"
  pipeline_class = "SanaPipeline"
  policies = (BLOCK,)

  @property
  def model(self) -> nn.Module:
    return sana_lib.SanaTransformer2DModel(self.config)

  def blocks(self) -> list[BlockRef]:
    return [BlockRef(f"transformer_blocks_{i}", BLOCK, sana_lib.SanaBlock(self.config))
            for i in range(self.config.num_layers)]
