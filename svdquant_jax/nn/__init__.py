"""Flax layers running the fused SVDQuant linear, and the ``nn.Dense`` swapping interceptor."""

from svdquant_jax.nn.dense import (
    SVDQuantDense,
    SVDQuantDenseNNX,
    layer_params,
    param_shapes,
    quantized_linear,
)
from svdquant_jax.nn.lora import lora_branches, lora_params, replace_norms, set_strengths, with_lora
from svdquant_jax.nn.swap import QuantSpec, replace_dense_params, swap_dense
from svdquant_jax.nn.weight_only import WeightOnlyDense, WeightOnlySpec, awq_params, weight_only_params

__all__ = [
    "SVDQuantDense", "SVDQuantDenseNNX", "layer_params", "param_shapes", "quantized_linear", "QuantSpec",
    "replace_dense_params", "swap_dense", "WeightOnlyDense", "WeightOnlySpec", "weight_only_params",
    "awq_params",
    "lora_branches", "lora_params", "replace_norms", "set_strengths", "with_lora",
]
