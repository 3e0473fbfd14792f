"""Which layers of each model are quantized how (SVDQuant spec §1.2 table and §1.8).

A block kind (FLUX double block, FLUX single block, PixArt block) has:
  * **W4A4 groups**: linears that share one input, hence one smoothing vector λ, and are
    calibrated together. Each linear keeps its own low-rank branch (q/k/v are already one
    fused kernel ``to_qkv``, so their down-projection is shared as in deepcompressor).
    The group's smoothing search and low-rank refinement minimize the squared output error
    of its *eval module*: the attention module for q/k/v, the whole block for the FLUX single
    block's fused input projections, and the linears themselves otherwise.
  * **weight-only layers** (W4A16 INT4 g64): the adaLN modulation linears of FLUX.
  * everything else stays 16-bit (embedders, norms, attention itself, PixArt cross-attention
    K/V on the T5 tokens, output projection).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from svdquant_jax.quant.taps import Path, parse_path


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
  """Quantization plan of one block kind."""
  kind: str
  groups: tuple[LinearGroup, ...]
  weight_only: tuple[str, ...] = ()

  def layer_names(self) -> list[str]:
    return [layer for g in self.groups for layer in g.layers] + list(self.weight_only)


FLUX_DOUBLE = BlockPolicy(
    kind="flux_double",
    groups=(
        LinearGroup("qkv", ("attn/to_qkv",), eval_module="attn"),
        LinearGroup("add_qkv", ("attn/add_qkv_proj",), eval_module="attn"),
        # to_out and to_add_out share one λ (spec §1.2); their loss is their own outputs.
        LinearGroup("out", ("attn/to_out", "attn/to_add_out"), shared_input=False),
        LinearGroup("ff.fc1", ("ff/fc1",)),
        LinearGroup("ff.fc2", ("ff/fc2",), unsigned=True),
        LinearGroup("ff_context.fc1", ("ff_context/fc1",)),
        LinearGroup("ff_context.fc2", ("ff_context/fc2",), unsigned=True),
    ),
    weight_only=("norm1/linear", "norm1_context/linear"),
)

FLUX_SINGLE = BlockPolicy(
    kind="flux_single",
    groups=(
        # q/k/v and the MLP input projection read the same normed input: one λ, two branches.
        LinearGroup("qkv_mlp", ("attn/to_qkv", "proj_mlp"), eval_module=""),
        LinearGroup("proj_out_attn", ("proj_out_attn",)),
        LinearGroup("proj_out_mlp", ("proj_out_mlp",), unsigned=True),
    ),
    weight_only=("norm/linear",),
)

PIXART_BLOCK = BlockPolicy(
    kind="pixart",
    groups=(
        LinearGroup("qkv", ("attn1/to_qkv",), eval_module="attn1"),
        LinearGroup("out", ("attn1/to_out",)),
        LinearGroup("cross_q", ("attn2/to_q",), eval_module="attn2"),
        LinearGroup("cross_out", ("attn2/to_out",)),
        LinearGroup("ff.fc1", ("ff/fc1",)),
        LinearGroup("ff.fc2", ("ff/fc2",), unsigned=True),
    ),
    # Cross-attention K/V (attn2/to_kv) read T5 features and stay 16-bit (spec §1.8).
)

POLICIES: Mapping[str, BlockPolicy] = {p.kind: p for p in (FLUX_DOUBLE, FLUX_SINGLE, PIXART_BLOCK)}


def resolve_skips(skips: Sequence[str], blocks: Mapping[str, str]) -> set[tuple[str, str]]:
  """Turns a user skip list into a set of ``(block_name, layer)`` pairs kept in 16-bit.

  Each entry may be a group name (``"ff_context.fc2"``), a block-relative layer path
  (``"attn/to_qkv"``, in every block of a kind that has it), or a full path
  (``"single_transformer_blocks_3/proj_mlp"``).

  Args:
    skips: the entries.
    blocks: block name -> block kind, for the model being quantized.

  Raises:
    ValueError: an entry that names no layer of this model, listing the valid names.
  """
  out: set[tuple[str, str]] = set()
  for entry in skips:
    hit = False
    for block, kind in blocks.items():
      policy = POLICIES[kind]
      for g in policy.groups:
        for layer in g.layers:
          if entry in (g.name, layer, f"{block}/{layer}"):
            out.add((block, layer))
            hit = True
      for layer in policy.weight_only:
        if entry in (layer, f"{block}/{layer}"):
          out.add((block, layer))
          hit = True
    if not hit:
      kinds = sorted(set(blocks.values()))
      names = sorted({n for k in kinds for g in POLICIES[k].groups for n in (g.name, *g.layers)}
                     | {layer for k in kinds for layer in POLICIES[k].weight_only})
      raise ValueError(f"unknown layer {entry!r} in the quantization skip list; valid names are group names and "
                       f"block-relative layers {names}, or '<block>/<layer>' with a block of this model "
                       f"(e.g. '{next(iter(blocks))}/{names[0]}')")
  return out
