"""emerflow_jax: emerging-item recommendation (EmerFlow and baselines) in JAX."""

__version__ = "0.1.0"
