"""PixArt-Sigma: 28 blocks (at full size) of self-attention, cross-attention to T5 and an MLP.

Policy (deepcompressor's PixArt-Sigma config): the self-attention, the cross-attention query and
output, and the MLP are W4A4; the cross-attention K/V read T5 features and stay 16-bit, as do
the embedders, adaLN-single and the caption projection.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from svdquant_jax.models import pixart as pixart_lib
from svdquant_jax.quant.adapters.base import Array, BlockPolicy, BlockRef, LinearGroup, ModelAdapter, State

BLOCK = BlockPolicy(
    kind="pixart",
    groups=(
        LinearGroup("qkv", ("attn1/to_qkv",), eval_module="attn1"),
        LinearGroup("out", ("attn1/to_out",)),
        LinearGroup("cross_q", ("attn2/to_q",), eval_module="attn2"),
        LinearGroup("cross_out", ("attn2/to_out",)),
        LinearGroup("ff.fc1", ("ff/fc1",)),
        LinearGroup("ff.fc2", ("ff/fc2",), unsigned=True),
    ),
)


@dataclasses.dataclass(frozen=True)
class PixArtAdapter(ModelAdapter):
  """:class:`~svdquant_jax.models.pixart.PixArtTransformer2DModel` block by block."""
  config: pixart_lib.PixArtConfig

  family = "pixart"
  pipeline_class = "PixArtSigmaPipeline"
  policies = (BLOCK,)
  streams = ("hidden_states",)

  @property
  def model(self) -> nn.Module:
    return pixart_lib.PixArtTransformer2DModel(self.config)

  def blocks(self) -> list[BlockRef]:
    return [BlockRef(f"transformer_blocks_{i}", BLOCK, pixart_lib.PixArtBlock(self.config))
            for i in range(self.config.num_layers)]

  def embed(self, params: Mapping[str, Any], inputs: Mapping[str, Array]) -> State:
    model = self.model
    out = model.apply({"params": params}, **inputs, method=model.embed)
    state = {"hidden_states": out["hidden_states"], "encoder_hidden_states": out["encoder_hidden_states"],
             "timestep_emb": out["timestep_emb"]}
    if out["encoder_attention_mask"] is not None:
      state["encoder_attention_mask"] = out["encoder_attention_mask"]
    return state

  def block_args(self, state: State) -> tuple[Any, ...]:
    return (state["hidden_states"], state["encoder_hidden_states"], state["timestep_emb"],
            state.get("encoder_attention_mask"))

  def update_state(self, state: State, output: Any) -> State:
    new = dict(state)
    new["hidden_states"] = output
    return new
