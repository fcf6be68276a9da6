"""avi_jax.models."""
