"""Observing and replacing `nn.Dense` layers inside any linen model, by module path.

Calibration needs, for one transformer block: the inputs of its linear layers (activation
statistics, GPTQ Hessians), the outputs of "eval modules" (the attention module, the block,
or the linear itself: ``docs/quantization.md``, "deepcompressor's recipe"), and the same
outputs with some linears replaced by their fake-quantized SVDQuant form.
:func:`apply_with_taps` does all three with ``flax.linen.intercept_methods``, so the models
need no quantization-specific code.

Paths are tuples of module names relative to the module being applied, e.g.
``("attn", "to_qkv")`` inside a ``FluxDoubleBlock``.

The interception is active only while the function traces; call :func:`apply_with_taps`
*inside* the jitted function (never wrap a jitted call in it), or the cached trace would
carry a stale interception.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping

import flax.linen as nn
import jax

Path = tuple[str, ...]
Array = jax.Array


def parse_path(name: str) -> Path:
  """``"attn/to_qkv"`` -> ``("attn", "to_qkv")``."""
  return tuple(p for p in name.split("/") if p)


def path_name(path: Path) -> str:
  return "/".join(path)


def apply_with_taps(module: nn.Module, variables: Mapping[str, Any], *args: Any,
                    replace: Mapping[Path, Callable[[Array], Array]] | None = None,
                    record_inputs: Collection[Path] = (), record_outputs: Collection[Path] = (),
                    **kwargs: Any) -> tuple[Any, dict[str, dict[Path, Any]]]:
  """Applies ``module`` while replacing and recording layers by path.

  Args:
    module: an unbound linen module (e.g. ``FluxDoubleBlock(config)``).
    variables: its variables (``{"params": ...}``).
    *args, **kwargs: the module's call arguments.
    replace: ``nn.Dense`` path -> function of the layer input that is used instead of the
      layer (e.g. a fake-quantized SVDQuant linear).
    record_inputs: ``nn.Dense`` paths whose input is recorded.
    record_outputs: paths of any submodules (or ``()`` for the module itself) whose output is
      recorded.

  Returns:
    ``(output, {"inputs": {path: x}, "outputs": {path: y}})``.

  Raises:
    ValueError: if a requested path was never called (e.g. a misspelled layer name), so that
      nothing is silently skipped.
  """
  replace = dict(replace or {})
  want_in, want_out = set(record_inputs), set(record_outputs)
  seen: set[Path] = set()
  recorded: dict[str, dict[Path, Any]] = {"inputs": {}, "outputs": {}}

  def interceptor(next_fun, call_args, call_kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    path = tuple(context.module.path)
    seen.add(path)
    is_dense = isinstance(context.module, nn.Dense)
    if is_dense and path in want_in:
      if path in recorded["inputs"]:
        raise ValueError(f"layer {path_name(path)} is called more than once; cannot record a single input")
      recorded["inputs"][path] = call_args[0]
    if is_dense and path in replace:
      out = replace[path](call_args[0])
    else:
      out = next_fun(*call_args, **call_kwargs)
    if path in want_out:
      recorded["outputs"][path] = out
    return out

  with nn.intercept_methods(interceptor):
    output = module.apply(variables, *args, **kwargs)
  if () in want_out:
    recorded["outputs"][()] = output
    seen.add(())
  missing = (set(replace) | want_in | want_out) - seen
  if missing:
    raise ValueError(f"{type(module).__name__} has no layer(s) {sorted(path_name(p) for p in missing)} "
                     f"(layers called: {sorted(path_name(p) for p in seen if p)})")
  return output, recorded
