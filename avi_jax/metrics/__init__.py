"""avi_jax.metrics."""
