"""avi_jax: AVI-Talking in JAX/Flax (Sun et al., IEEE Access 2024, arXiv:2402.16124)."""

__version__ = "0.1.0"
