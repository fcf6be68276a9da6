"""avi_jax.render."""
