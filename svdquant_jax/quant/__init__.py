"""SVDQuant post-training quantization: the public API.

One group of linear layers that share an input (your own model's, or a transformer's)::

    from svdquant_jax import quant
    settings = quant.PTQSettings(fmt=quant.INT4, rank=32)
    layers = quant.quantize_linear_group(kernels, biases, x_calib, settings)
    deployed = [quant.to_quantized_linear(w, settings.fmt) for w in layers]

A whole diffusion transformer, block by block (the PTQ flow, ``svdquant_jax.flows.ptq``, runs
this with calibration collection, evaluation and files on disk)::

    adapter = quant.adapter_for_pipeline(pipeline)
    state = quant.initial_state(adapter, params, calibration_set, indices, batch_size)
    layers = quant.quantize_transformer(adapter, params, state, settings)
    qparams, specs = quant.quantize_params(params, layers, dtype)
    quant.save_quantized(folder, qparams, specs, metadata=...)

The modules behind it (``weights``, ``smooth``, ``lowrank``, ``gptq``, ``svdquant``, ``deploy``,
``settings``, ``adapters``, ``ptq``, ``quantized_model``, ``taps``) stay importable for the details.
"""

from svdquant_jax.formats.quantizers import (FORMATS, GELU_SHIFT, INT4, NVFP4, W4A16_INT4, W4A16_NF4, W8A8,
                                             QuantFormat, QuantizationError)
from svdquant_jax.quant.adapters import ModelAdapter, adapter_for, adapter_for_pipeline
from svdquant_jax.quant.deploy import to_quantized_linear
from svdquant_jax.quant.ptq import QuantizedLayer, block_errors, initial_state, quantize_transformer
from svdquant_jax.quant.quantized_model import (QuantizedCheckpointError, load_for_model, load_quantized,
                                                quantize_params, save_quantized, transformer_fn)
from svdquant_jax.quant.settings import PTQSettings
from svdquant_jax.quant.svdquant import GroupQuantInfo, quantize_linear_group, quantize_linear_groups
from svdquant_jax.quant.taps import apply_with_taps, parse_path
from svdquant_jax.quant.weights import SVDQuantWeights, fake_forward

__all__ = [
    "FORMATS", "GELU_SHIFT", "INT4", "NVFP4", "W4A16_INT4", "W4A16_NF4", "W8A8", "QuantFormat", "QuantizationError",
    "ModelAdapter", "adapter_for", "adapter_for_pipeline", "to_quantized_linear", "QuantizedLayer", "block_errors",
    "initial_state", "quantize_transformer", "QuantizedCheckpointError", "load_for_model", "load_quantized",
    "quantize_params", "save_quantized", "transformer_fn", "PTQSettings", "GroupQuantInfo", "quantize_linear_group",
    "quantize_linear_groups", "apply_with_taps", "parse_path", "SVDQuantWeights", "fake_forward",
]
