"""The implementation; the public API is ``gradient_ascent_jax.__all__``."""
