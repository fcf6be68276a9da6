"""avi_jax.checkpoints."""
