"""What the PTQ driver needs to know about a model family, as one object: :class:`ModelAdapter`.

A family's adapter (one file per family beside this one) declares:

* the **blocks** in order (:meth:`ModelAdapter.blocks`), each with its standalone Flax module and
  its :class:`BlockPolicy`: the **linear groups** (linears that read one input, hence share one
  smoothing vector λ and are calibrated together), the **weight-only** (W4A16) layers, and by
  omission the layers that stay 16-bit;
* how the pipeline **feeds the transformer**: its pipeline class, which call arguments are shared
  by a whole batch (:attr:`ModelAdapter.shared_inputs`), and how stacked calibration samples
  become call arguments (:meth:`ModelAdapter.call_inputs`);
* how to **run a block on cached inputs**: the transformer's call arguments become the first
  block's *state* (:meth:`ModelAdapter.embed`), a dict of arrays with a leading sample axis; a
  block reads its arguments from the state (:meth:`ModelAdapter.block_args`) and writes its
  outputs back (:meth:`ModelAdapter.update_state`); :attr:`ModelAdapter.streams` names the state
  entries a block changes (its output, for error reports).

Adapters are frozen dataclasses of the model config: hashable, so they are static ``jax.jit``
arguments, and two adapters of the same config are equal (one compilation serves both).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from svdquant_jax.quant.taps import Path, parse_path

Array = jax.Array
State = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class LinearGroup:
  """Linears sharing an input (one λ).

  Attributes:
    name: group name, used in skip lists and logs (e.g. ``"qkv"``).
    layers: block-relative ``nn.Dense`` paths (``"attn/to_qkv"``).
    eval_module: block-relative path of the module whose output error is minimized; ``""``
      is the whole block; ``None`` means each linear's own output.
    unsigned: the input is a GELU output, shifted by +0.171875 and quantized unsigned (INT4).
    shared_input: the layers read the same tensor. False for FLUX ``to_out``/``to_add_out``,
      which read the image and the text part of the attention output but share one λ: their
      activation statistics are taken over both inputs.
  """
  name: str
  layers: tuple[str, ...]
  eval_module: str | None = None
  unsigned: bool = False
  shared_input: bool = True

  @property
  def paths(self) -> tuple[Path, ...]:
    return tuple(parse_path(layer) for layer in self.layers)


@dataclasses.dataclass(frozen=True)
class BlockPolicy:
  """Quantization plan of one block kind: W4A4 groups and weight-only layers; the rest stays 16-bit."""
  kind: str
  groups: tuple[LinearGroup, ...]
  weight_only: tuple[str, ...] = ()

  def layer_names(self) -> list[str]:
    return [layer for g in self.groups for layer in g.layers] + list(self.weight_only)


@dataclasses.dataclass(frozen=True)
class BlockRef:
  """One block: its params key, its policy, and its standalone module (unbound)."""
  name: str
  policy: BlockPolicy
  module: nn.Module

  @property
  def kind(self) -> str:
    return self.policy.kind


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
  """Block-by-block access to one family's transformer (subclassed once per family).

  Attributes:
    config: the transformer config (a frozen dataclass).
  """
  config: Any

  family: ClassVar[str]                       # "flux", "pixart": stored with quantized models
  pipeline_class: ClassVar[str]               # the pipeline's ``pipeline_class`` (diffusers' name)
  policies: ClassVar[tuple[BlockPolicy, ...]]
  shared_inputs: ClassVar[tuple[str, ...]] = ()      # call arguments without a batch axis
  streams: ClassVar[tuple[str, ...]] = ("hidden_states",)  # state entries a block writes

  # ------------------------------------------------------------------ per family
  @property
  def model(self) -> nn.Module:
    """The whole transformer module."""
    raise NotImplementedError

  def blocks(self) -> list[BlockRef]:
    """The blocks in call order."""
    raise NotImplementedError

  def embed(self, params: Mapping[str, Any], inputs: Mapping[str, Array]) -> State:
    """Transformer call arguments (batched) -> the first block's state (batched)."""
    raise NotImplementedError

  def block_args(self, state: State) -> tuple[Any, ...]:
    """The block call arguments from a (batched) state."""
    raise NotImplementedError

  def update_state(self, state: State, output: Any) -> State:
    """The state after a block, from the block's output."""
    raise NotImplementedError

  # ------------------------------------------------------------------ shared
  def policy(self, kind: str) -> BlockPolicy:
    for p in self.policies:
      if p.kind == kind:
        return p
    raise ValueError(f"{self.family}: unknown block kind {kind!r}; expected one of "
                     f"{[p.kind for p in self.policies]}")

  def block_module(self, kind: str) -> nn.Module:
    """The standalone module of a block kind."""
    self.policy(kind)
    return next(b.module for b in self.blocks() if b.kind == kind)

  def call_inputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked calibration samples -> the transformer's call arguments.

    Per-sample tensors gain a batch axis when stacked; the :attr:`shared_inputs` (e.g. FLUX's
    token ids) are taken from the first sample after checking that all samples agree (samples
    of different resolutions cannot be batched).
    """
    out = dict(batch)
    for name in self.shared_inputs:
      values = out[name]
      if not np.all(values == values[:1]):
        raise ValueError(f"calibration samples in one batch have different {name} (different resolutions); "
                         "collect calibration data at one resolution")
      out[name] = values[0]
    return out

  def resolve_skips(self, skips: Sequence[str]) -> set[tuple[str, str]]:
    """Turns a user skip list into the ``(block name, layer)`` pairs kept in 16-bit.

    Each entry may be a group name (``"ff_context.fc2"``), a block-relative layer path
    (``"attn/to_qkv"``, in every block of a kind that has it), or a full path
    (``"single_transformer_blocks_3/proj_mlp"``).

    Raises:
      ValueError: an entry that names no layer of this model, listing the valid names.
    """
    blocks = self.blocks()
    out: set[tuple[str, str]] = set()
    for entry in skips:
      hit = False
      for block in blocks:
        for group in block.policy.groups:
          for layer in group.layers:
            if entry in (group.name, layer, f"{block.name}/{layer}"):
              out.add((block.name, layer))
              hit = True
        for layer in block.policy.weight_only:
          if entry in (layer, f"{block.name}/{layer}"):
            out.add((block.name, layer))
            hit = True
      if not hit:
        names = sorted({n for p in self.policies for g in p.groups for n in (g.name, *g.layers)}
                       | {layer for p in self.policies for layer in p.weight_only})
        raise ValueError(f"unknown layer {entry!r} in the quantization skip list; valid names are group names and "
                         f"block-relative layers {names}, or '<block>/<layer>' with a block of this model "
                         f"(e.g. '{blocks[0].name}/{names[0]}')")
    return out

