"""FLUX.1 (dev / schnell): 19 double-stream then 38 single-stream blocks (at full size).

Policy (deepcompressor's FLUX.1 configs, paper §4.1): every linear of the blocks is W4A4, in the
groups below; the adaLN modulation linears are W4A16 (INT4 g64); embedders, norms, attention and
the output projection stay 16-bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from svdquant_jax.models import flux as flux_lib
from svdquant_jax.quant.adapters.base import Array, BlockPolicy, BlockRef, LinearGroup, ModelAdapter, State

DOUBLE = BlockPolicy(
    kind="flux_double",
    groups=(
        LinearGroup("qkv", ("attn/to_qkv",), eval_module="attn"),
        LinearGroup("add_qkv", ("attn/add_qkv_proj",), eval_module="attn"),
        # to_out and to_add_out share one λ (as deepcompressor); their loss is their own outputs.
        LinearGroup("out", ("attn/to_out", "attn/to_add_out"), shared_input=False),
        LinearGroup("ff.fc1", ("ff/fc1",)),
        LinearGroup("ff.fc2", ("ff/fc2",), unsigned=True),
        LinearGroup("ff_context.fc1", ("ff_context/fc1",)),
        LinearGroup("ff_context.fc2", ("ff_context/fc2",), unsigned=True),
    ),
    weight_only=("norm1/linear", "norm1_context/linear"),
)

SINGLE = BlockPolicy(
    kind="flux_single",
    groups=(
        # q/k/v and the MLP input projection read the same normed input: one λ, two branches.
        LinearGroup("qkv_mlp", ("attn/to_qkv", "proj_mlp"), eval_module=""),
        LinearGroup("proj_out_attn", ("proj_out_attn",)),
        LinearGroup("proj_out_mlp", ("proj_out_mlp",), unsigned=True),
    ),
    weight_only=("norm/linear",),
)


@dataclasses.dataclass(frozen=True)
class FluxAdapter(ModelAdapter):
  """:class:`~svdquant_jax.models.flux.FluxTransformer2DModel` block by block."""
  config: flux_lib.FluxConfig

  family = "flux"
  pipeline_class = "FluxPipeline"
  policies = (DOUBLE, SINGLE)
  shared_inputs = ("img_ids", "txt_ids")
  streams = ("hidden_states", "encoder_hidden_states")

  @property
  def model(self) -> nn.Module:
    return flux_lib.FluxTransformer2DModel(self.config)

  def blocks(self) -> list[BlockRef]:
    cfg = self.config
    return ([BlockRef(f"transformer_blocks_{i}", DOUBLE, flux_lib.FluxDoubleBlock(cfg))
             for i in range(cfg.num_layers)]
            + [BlockRef(f"single_transformer_blocks_{i}", SINGLE, flux_lib.FluxSingleBlock(cfg))
               for i in range(cfg.num_single_layers)])

  def embed(self, params: Mapping[str, Any], inputs: Mapping[str, Array]) -> State:
    model = self.model
    out = model.apply({"params": params}, **inputs, method=model.embed)
    cos, sin = out["image_rotary_emb"]
    b = out["hidden_states"].shape[0]
    # The rotary tables depend only on the token ids; carried per sample so that a sample is
    # self-contained (they are small next to the hidden states).
    return {"hidden_states": out["hidden_states"], "encoder_hidden_states": out["encoder_hidden_states"],
            "temb": out["temb"], "rope_cos": jnp.broadcast_to(cos, (b,) + cos.shape),
            "rope_sin": jnp.broadcast_to(sin, (b,) + sin.shape)}

  def block_args(self, state: State) -> tuple[Any, ...]:
    rope = (state["rope_cos"][0], state["rope_sin"][0])
    return state["hidden_states"], state["encoder_hidden_states"], state["temb"], rope

  def update_state(self, state: State, output: Any) -> State:
    new = dict(state)
    new["encoder_hidden_states"], new["hidden_states"] = output
    return new
