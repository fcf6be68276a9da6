"""avi_jax.training."""
