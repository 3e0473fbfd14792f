"""Declarative mapping of external (diffusers / transformers) checkpoints onto Flax params.

A model's loader is a *table*: a list of :class:`Rule`, each naming one Flax parameter leaf
(``"transformer_blocks_0/attn/to_qkv/kernel"``), the checkpoint tensor(s) it is made from
(``"transformer_blocks.0.attn.to_q.weight"``, ...) and a conversion (transpose a PyTorch
``[out, in]`` linear weight to Flax ``[in, out]``, concatenate q/k/v, ...). Tables are built
by a function of the model config so that the layer count is explicit; no string-replace
chains.

:func:`load_params` applies a table to a :class:`~svdquant_jax.utils.safetensors_io.TensorStore`
and validates the result against ``jax.eval_shape(model.init, ...)``: every missing,
unexpected or misshaped tensor is reported by name in one :class:`CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from svdquant_jax.utils.files import read_json
from svdquant_jax.utils.trees import MAX_LISTED, flatten, listing, unflatten, validate_tree
from svdquant_jax.utils.safetensors_io import CheckpointError, TensorStore

Convert = Callable[[Sequence[np.ndarray]], np.ndarray]


# ----------------------------------------------------------------------------- conversions
def identity(xs: Sequence[np.ndarray]) -> np.ndarray:
  """One source tensor, unchanged."""
  (x,) = xs
  return x


def linear(xs: Sequence[np.ndarray]) -> np.ndarray:
  """PyTorch ``nn.Linear.weight`` ``[out, in]`` -> Flax ``Dense.kernel`` ``[in, out]``."""
  (x,) = xs
  return np.asarray(x).T


def concat_linear(xs: Sequence[np.ndarray]) -> np.ndarray:
  """Several ``[out_i, in]`` weights -> one ``[in, sum(out_i)]`` kernel (fused q/k/v)."""
  return np.concatenate([np.asarray(x).T for x in xs], axis=-1)


def concat(xs: Sequence[np.ndarray]) -> np.ndarray:
  """Concatenates 1-D tensors (e.g. fused q/k/v biases)."""
  return np.concatenate([np.asarray(x) for x in xs], axis=-1)


def conv2d(xs: Sequence[np.ndarray]) -> np.ndarray:
  """PyTorch ``Conv2d.weight`` ``[O, I, H, W]`` -> Flax ``Conv.kernel`` ``[H, W, I, O]``."""
  (x,) = xs
  return np.transpose(np.asarray(x), (2, 3, 1, 0))


def linear_in_slice(start: int, stop: int) -> Convert:
  """``[out, in]`` weight -> kernel ``[stop - start, out]`` made of input columns ``start:stop``.

  Used where one PyTorch linear over a concatenated input is split in two Flax layers
  (e.g. the FLUX single block ``proj_out`` over ``[attn_out; mlp_hidden]``).
  """
  def convert(xs: Sequence[np.ndarray]) -> np.ndarray:
    (x,) = xs
    x = np.asarray(x)
    if stop > x.shape[1]:
      raise CheckpointError(f"cannot take input columns {start}:{stop} of a weight of shape {x.shape}")
    return x[:, start:stop].T
  return convert


def linear_out_slice(start: int, stop: int) -> Convert:
  """``[out, in]`` weight -> kernel ``[in, stop - start]`` made of output rows ``start:stop``."""
  def convert(xs: Sequence[np.ndarray]) -> np.ndarray:
    (x,) = xs
    x = np.asarray(x)
    if stop > x.shape[0]:
      raise CheckpointError(f"cannot take output rows {start}:{stop} of a weight of shape {x.shape}")
    return x[start:stop].T
  return convert


def vector_slice(start: int, stop: int) -> Convert:
  """A 1-D tensor's elements ``start:stop``."""
  def convert(xs: Sequence[np.ndarray]) -> np.ndarray:
    (x,) = xs
    return np.asarray(x)[start:stop]
  return convert


# ----------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Rule:
  """One Flax parameter leaf and the checkpoint tensor(s) it is built from.

  Attributes:
    target: ``/``-joined path in the Flax params tree (without the ``params`` collection).
    sources: checkpoint tensor names, in the order ``convert`` expects them.
    convert: function from the source arrays to the target array.
  """
  target: str
  sources: tuple[str, ...]
  convert: Convert = identity

  def __post_init__(self):
    if isinstance(self.sources, str):
      object.__setattr__(self, "sources", (self.sources,))


def dense_rules(target: str, source: str, bias: bool = True) -> list[Rule]:
  """Rules for one ``nn.Linear`` -> ``nn.Dense`` (``target/kernel`` and ``target/bias``)."""
  rules = [Rule(f"{target}/kernel", (f"{source}.weight",), linear)]
  if bias:
    rules.append(Rule(f"{target}/bias", (f"{source}.bias",), identity))
  return rules


def fused_dense_rules(target: str, sources: Sequence[str], bias: bool = True) -> list[Rule]:
  """Rules for several ``nn.Linear`` sharing an input fused into one ``nn.Dense``."""
  rules = [Rule(f"{target}/kernel", tuple(f"{s}.weight" for s in sources), concat_linear)]
  if bias:
    rules.append(Rule(f"{target}/bias", tuple(f"{s}.bias" for s in sources), concat))
  return rules


def norm_rules(target: str, source: str, bias: bool = True) -> list[Rule]:
  """Rules for a LayerNorm/GroupNorm/RMSNorm: ``weight`` -> ``scale``, ``bias`` -> ``bias``."""
  rules = [Rule(f"{target}/scale", (f"{source}.weight",), identity)]
  if bias:
    rules.append(Rule(f"{target}/bias", (f"{source}.bias",), identity))
  return rules


def conv_rules(target: str, source: str, bias: bool = True) -> list[Rule]:
  """Rules for one ``nn.Conv2d`` -> ``nn.Conv`` (NHWC)."""
  rules = [Rule(f"{target}/kernel", (f"{source}.weight",), conv2d)]
  if bias:
    rules.append(Rule(f"{target}/bias", (f"{source}.bias",), identity))
  return rules


def load_params(store: Mapping[str, np.ndarray], rules: Sequence[Rule], abstract: Mapping[str, Any], *,
                ignore: Sequence[str] = (), source: str = "checkpoint",
                to_device: bool = True) -> dict[str, Any]:
  """Builds a Flax params tree from checkpoint tensors by a mapping table.

  Args:
    store: checkpoint tensors by name (a :class:`TensorStore` or a dict).
    rules: the mapping table.
    abstract: the expected params tree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``);
      every converted tensor is cast to the leaf's dtype.
    ignore: regular expressions (``re.fullmatch``) for checkpoint tensors that are known
      and deliberately unused (e.g. buffers such as ``position_ids``).
    source: a name for the checkpoint in error messages (usually its path).
    to_device: return ``jax.Array`` leaves (else numpy arrays).

  Returns:
    Nested dict of arrays with exactly the structure, shapes and dtypes of ``abstract``.

  Raises:
    CheckpointError: listing every missing checkpoint tensor, unused checkpoint tensor,
      parameter the table does not produce, and shape mismatch, each by name.
  """
  want = flatten(abstract)
  targets = [r.target for r in rules]
  dup = {t for t in targets if targets.count(t) > 1}
  if dup:
    raise ValueError(f"mapping table maps several rules to {listing(dup)}")
  unknown_targets = set(targets) - set(want)
  if unknown_targets:
    raise ValueError(f"mapping table names params the model does not have: {listing(unknown_targets)}")

  problems = []
  missing_sources = sorted({s for r in rules for s in r.sources if s not in store})
  if missing_sources:
    problems.append(f"missing tensor(s) {listing(missing_sources)}")
  used = {s for r in rules for s in r.sources}
  ignore_re = [re.compile(p) for p in ignore]
  unused = [k for k in store if k not in used and not any(p.fullmatch(k) for p in ignore_re)]
  if unused:
    problems.append(f"unexpected tensor(s) {listing(unused)}")
  not_produced = set(want) - set(targets)
  if not_produced:
    problems.append(f"no checkpoint tensor maps to param(s) {listing(not_produced)}")
  if problems:
    raise CheckpointError(f"{source} does not match the model: " + " | ".join(problems))

  flat: dict[str, Any] = {}
  bad = []
  for r in rules:
    value = r.convert([store[s] for s in r.sources])
    expected = want[r.target]
    if tuple(value.shape) != tuple(expected.shape):
      bad.append(f"{'+'.join(r.sources)} -> {r.target}: shape {tuple(value.shape)} != expected "
                 f"{tuple(expected.shape)}")
      continue
    value = np.asarray(value).astype(expected.dtype)
    flat[r.target] = jnp.asarray(value) if to_device else value
  if bad:
    raise CheckpointError(f"{source} does not match the model: " + "; ".join(bad[:MAX_LISTED]) +
                          (f"; ... ({len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""))
  params = unflatten(flat)
  validate_tree(params, abstract, what=f"params loaded from {source}")
  return params


# ----------------------------------------------------------------------------- folders
def read_config(folder: str | os.PathLike, expected_classes: Sequence[str] = (),
                filename: str = "config.json") -> dict[str, Any]:
  """Reads a component's ``config.json`` and checks its class name.

  Args:
    folder: the component folder (e.g. ``.../transformer``).
    expected_classes: accepted values of ``_class_name`` (diffusers) or ``architectures``
      (transformers); empty accepts any.

  Raises:
    CheckpointError: if the folder or config is missing, or the class is a different model.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CheckpointError(f"component folder not found: {folder}")
  cfg = read_json(os.path.join(folder, filename), CheckpointError,
                  f"{folder}: no {filename}; is this a diffusers/transformers component folder?")
  if expected_classes:
    names = [cfg.get("_class_name")] + list(cfg.get("architectures") or [])
    names = [n for n in names if n]
    if not any(n in expected_classes for n in names):
      raise CheckpointError(f"{folder} holds a {names[0] if names else 'model of unknown class'}, "
                            f"expected one of {list(expected_classes)}")
  return cfg


def read_model_config(folder: str | os.PathLike, expected_classes: Sequence[str],
                      build: Callable[..., Any], **overrides: Any) -> Any:
  """A model config from a component's ``config.json``: ``build(raw_dict, **overrides)``.

  Raises:
    CheckpointError: the folder or file is missing, the class is another model, or ``build``
      rejects a value (the message names the file).
  """
  raw = read_config(folder, expected_classes)
  try:
    return build(raw, **overrides)
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(f"{os.path.join(os.fspath(folder), 'config.json')}: {e}") from e


def open_store(folder: str | os.PathLike, variant: str | None = None) -> TensorStore:
  """Opens the safetensors weights of a component folder (single file or sharded).

  ``variant`` picks diffusers' ``*.<variant>.safetensors`` files (e.g. ``"fp16"``); by default
  the files without a variant are read.
  """
  return TensorStore(folder, variant)
