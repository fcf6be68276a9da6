"""avi_jax.data."""
