"""Nunchaku interop: FLUX.1 checkpoints in Nunchaku's 4-bit format, both ways (``docs/nunchaku.md``)."""

from svdquant_jax.quant.nunchaku.export import NunchakuExportError, export_flux, model_format
from svdquant_jax.quant.nunchaku.flux_layout import SVD_RANK, expected_params
from svdquant_jax.quant.nunchaku.load import NunchakuFormatError, NunchakuModel, load_flux
from svdquant_jax.quant.nunchaku.lora import load_nunchaku_lora

__all__ = ["NunchakuExportError", "NunchakuFormatError", "NunchakuModel", "SVD_RANK", "export_flux", "expected_params",
           "load_flux", "load_nunchaku_lora", "model_format"]
