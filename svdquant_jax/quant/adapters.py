"""How to run each supported transformer block by block (for calibration replay).

An adapter turns one calibration sample (the transformer's call arguments, as recorded by the
pipeline) into the first block's *state*, names the blocks in order, and says how a block
reads and updates the state. The state is a dict of arrays with a leading sample axis; blocks
read part of it and replace ``hidden_states`` / ``encoder_hidden_states``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdquant_jax.models import flux as flux_lib
from svdquant_jax.models import pixart as pixart_lib

Array = jax.Array
State = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class BlockRef:
  """One block: its params key, its policy kind, and its standalone module (unbound)."""
  name: str
  kind: str
  module: nn.Module


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
  """Block-by-block access to a transformer (hashable: used as a static jit argument).

  Attributes:
    family: ``"flux"`` or ``"pixart"``.
    config: the model config (frozen dataclass).
  """
  family: str
  config: Any

  @property
  def model(self) -> nn.Module:
    if self.family == "flux":
      return flux_lib.FluxTransformer2DModel(self.config)
    return pixart_lib.PixArtTransformer2DModel(self.config)

  def blocks(self) -> list[BlockRef]:
    cfg = self.config
    if self.family == "flux":
      return ([BlockRef(f"transformer_blocks_{i}", "flux_double", flux_lib.FluxDoubleBlock(cfg))
               for i in range(cfg.num_layers)]
              + [BlockRef(f"single_transformer_blocks_{i}", "flux_single", flux_lib.FluxSingleBlock(cfg))
                 for i in range(cfg.num_single_layers)])
    return [BlockRef(f"transformer_blocks_{i}", "pixart", pixart_lib.PixArtBlock(cfg)) for i in range(cfg.num_layers)]

  def block_module(self, kind: str) -> nn.Module:
    """The standalone module of a block kind (``flux_double``, ``flux_single``, ``pixart``)."""
    modules = {"flux_double": lambda: flux_lib.FluxDoubleBlock(self.config),
               "flux_single": lambda: flux_lib.FluxSingleBlock(self.config),
               "pixart": lambda: pixart_lib.PixArtBlock(self.config)}
    if kind not in modules:
      raise ValueError(f"unknown block kind {kind!r}")
    return modules[kind]()

  def embed(self, params: Mapping[str, Any], inputs: Mapping[str, Array]) -> State:
    """Transformer call arguments (batched) -> the first block's state (batched)."""
    model = self.model
    if self.family == "flux":
      out = model.apply({"params": params}, **inputs, method=model.embed)
      cos, sin = out["image_rotary_emb"]
      b = out["hidden_states"].shape[0]
      # The rotary tables depend only on the token ids; carried per sample so that a sample
      # is self-contained (they are small next to the hidden states).
      return {"hidden_states": out["hidden_states"], "encoder_hidden_states": out["encoder_hidden_states"],
              "temb": out["temb"], "rope_cos": jnp.broadcast_to(cos, (b,) + cos.shape),
              "rope_sin": jnp.broadcast_to(sin, (b,) + sin.shape)}
    out = model.apply({"params": params}, **inputs, method=model.embed)
    state = {"hidden_states": out["hidden_states"], "encoder_hidden_states": out["encoder_hidden_states"],
             "timestep_emb": out["timestep_emb"]}
    if out["encoder_attention_mask"] is not None:
      state["encoder_attention_mask"] = out["encoder_attention_mask"]
    return state

  def block_args(self, state: State) -> tuple[Any, ...]:
    """The block call arguments from a (batched) state."""
    if self.family == "flux":
      rope = (state["rope_cos"][0], state["rope_sin"][0])
      return state["hidden_states"], state["encoder_hidden_states"], state["temb"], rope
    return (state["hidden_states"], state["encoder_hidden_states"], state["timestep_emb"],
            state.get("encoder_attention_mask"))

  def update_state(self, state: State, output: Any) -> State:
    """The state after a block, from the block's output."""
    new = dict(state)
    if self.family == "flux":
      new["encoder_hidden_states"], new["hidden_states"] = output
    else:
      new["hidden_states"] = output
    return new


def adapter_for(family: str, config: Any) -> ModelAdapter:
  if family not in ("flux", "pixart"):
    raise ValueError(f"unknown model family {family!r}; expected 'flux' or 'pixart'")
  return ModelAdapter(family, config)


def per_sample(fn: Callable[[State], Any]) -> Callable[[State], Any]:
  """Lifts a function of a batched state to one of a single sample (adds a batch axis of 1)."""
  def wrapped(sample: State) -> Any:
    out = fn({k: v[None] for k, v in sample.items()})
    return jax.tree_util.tree_map(lambda a: a[0], out)
  return wrapped
