"""wstal_jax: weakly-supervised temporal action localization in JAX/Flax."""

__version__ = "0.1.0"
