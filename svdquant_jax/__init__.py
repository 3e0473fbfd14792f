"""svdquant-jax: SVDQuant W4A4 post-training quantization of diffusion transformers in JAX."""

__version__ = "0.1.0"
