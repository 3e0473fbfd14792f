"""Module swapping: run a user's linen model with selected ``nn.Dense`` layers replaced by
:class:`~svdquant_jax.nn.dense.SVDQuantDense`, keeping each layer's parameter path.

Gemma-style interception (``flax.linen.intercept_methods``): inside :func:`swap_dense`, a
call to a selected ``nn.Dense`` runs an ``SVDQuantDense`` that shares the Dense's scope, so
``model.init`` creates (and ``model.apply`` reads) ``qweight``, ``wscales``, ``smooth``,
``lora_down``, ``lora_up``, ``bias`` where the Dense's ``kernel``/``bias`` were::

  spec = {"block/attn/to_qkv": QuantSpec(rank=32), "block/ff/fc2": QuantSpec(shift=GELU_SHIFT)}
  with swap_dense(spec):
    y = model.apply({"params": quantized_params}, x)

:func:`replace_dense_params` turns a float params tree into the swapped one, from one
:class:`~svdquant_jax.pallas.QuantizedLinear` per selected path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Union

import flax.linen as nn

from svdquant_jax.nn.dense import SVDQuantDense, layer_params
from svdquant_jax.nn.weight_only import WeightOnlyDense, WeightOnlySpec
from svdquant_jax.formats.packing import QuantizedLinear
from svdquant_jax.utils import trees
from svdquant_jax.utils.safetensors_io import CheckpointError


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Static quantization settings of one swapped layer (see :class:`SVDQuantDense`;
  ``channel_scales``: the nvfp4 layer has per-channel weight scales ``wcscales``;
  ``rotation_block``/``rotation_seed``: the online input rotation, block 0: none)."""
  rank: int = 32
  fmt: str = "int4"
  shift: float = 0.0
  backend: str | None = None
  interpret: bool = False
  channel_scales: bool = False
  rotation_block: int = 0
  rotation_seed: int = 0

  @classmethod
  def of(cls, ql: QuantizedLinear, **kwargs: Any) -> QuantSpec:
    """The spec matching a packed layer."""
    return cls(rank=ql.rank, fmt=ql.fmt, shift=ql.shift, channel_scales=ql.wcscales is not None,
               rotation_block=ql.rotation_block, rotation_seed=ql.rotation_seed, **kwargs)


Spec = Union[QuantSpec, WeightOnlySpec]
Selector = Union[Mapping[str, Spec], Callable[[str, nn.Dense], Union[Spec, None]]]


def _dense_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


@contextlib.contextmanager
def swap_dense(selector: Selector, *, check_paths: bool = True) -> Iterator[set[str]]:
  """Within the context, the selected ``nn.Dense`` layers run as ``SVDQuantDense``.

  Args:
    selector: ``{path: QuantSpec}`` with ``/``-joined module paths (without ``params``), or a
      function ``(path, dense) -> QuantSpec | None``.
    check_paths: with a dict selector, raise on exit (``ValueError``) if a path was never
      called, so that a misspelled path is not silently left in float.

  Yields:
    The set of paths swapped so far (filled while the model runs).
  """
  swapped: set[str] = set()
  replacements: dict[int, tuple[nn.Module, SVDQuantDense]] = {}

  def choose(path: str, dense: nn.Dense) -> QuantSpec | None:
    if isinstance(selector, Mapping):
      return selector.get(path)
    return selector(path, dense)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module) is not nn.Dense:
      return next_fun(*args, **kwargs)
    cached = replacements.get(id(module))
    if cached is None:
      path = _dense_path(module)
      spec = choose(path, module)
      if spec is None:
        return next_fun(*args, **kwargs)
      if isinstance(spec, QuantSpec):
        replacement = SVDQuantDense(
            features=module.features, use_bias=module.use_bias, dtype=module.dtype, param_dtype=module.param_dtype,
            rank=spec.rank, fmt=spec.fmt, shift=spec.shift, channel_scales=spec.channel_scales,
            backend=spec.backend, interpret=spec.interpret, rotation_block=spec.rotation_block,
            rotation_seed=spec.rotation_seed, wrapped=module)
      elif isinstance(spec, WeightOnlySpec):
        replacement = WeightOnlyDense(features=module.features, use_bias=module.use_bias, dtype=module.dtype,
                                      param_dtype=module.param_dtype, spec=spec, wrapped=module)
      else:
        raise TypeError(f"swap_dense: the selector returned {type(spec).__name__} for {path!r}, expected "
                        "QuantSpec or WeightOnlySpec")
      # Keep the original module alive so that its id is not reused within the context.
      cached = replacements[id(module)] = (module, replacement)
      swapped.add(path)
    return cached[1](*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield swapped
  if check_paths and isinstance(selector, Mapping):
    missing = sorted(set(selector) - swapped)
    if missing:
      raise ValueError(f"swap_dense: no nn.Dense was called at path(s) {missing}; swapped: {sorted(swapped)}")


def replace_dense_params(params: Mapping[str, Any],
                         layers: Mapping[str, QuantizedLinear | Mapping[str, Any]]) -> dict[str, Any]:
  """Replaces the ``kernel``/``bias`` of each ``nn.Dense`` at ``path`` by the quantized layer's
  parameters (the tree :func:`swap_dense` expects).

  Args:
    params: a float params tree (without the ``params`` collection key).
    layers: ``{path: QuantizedLinear}``, or ``{path: params subtree}`` for other swapped layers
      (e.g. :func:`~svdquant_jax.nn.weight_only_params`).

  Raises:
    CheckpointError: a path that is not a Dense's parameters in ``params``, or whose kernel
      shape does not match the quantized layer.
  """
  flat = trees.flatten(params)
  for path, layer in layers.items():
    kernel = flat.get(f"{path}/kernel")
    if kernel is None:
      raise CheckpointError(f"replace_dense_params: no Dense kernel at {path!r}/kernel")
    if isinstance(layer, QuantizedLinear):
      if tuple(kernel.shape) != (layer.in_features, layer.out_features):
        raise CheckpointError(f"replace_dense_params: {path}/kernel has shape {tuple(kernel.shape)}, the "
                                         f"quantized layer is [{layer.in_features}, {layer.out_features}]")
      subtree = layer_params(layer)
    else:
      subtree = dict(layer)
    own = [p for p in flat if p.startswith(f"{path}/") and "/" not in p[len(path) + 1:]]
    if set(own) - {f"{path}/kernel", f"{path}/bias"}:
      raise CheckpointError(f"replace_dense_params: {path!r} holds more than a Dense's kernel/bias: "
                                       f"{sorted(own)}")
    for p in own:
      del flat[p]
    for name, value in subtree.items():
      flat[f"{path}/{name}"] = value
  return trees.unflatten(flat)
