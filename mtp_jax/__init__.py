"""mtp_jax: multi-token prediction language models in JAX/Flax.

Importing the package loads nothing else (no jax), so `mtp_jax.__version__` and the command-line
programs' --help stay fast; the library's modules are imported by name (mtp_jax.train, mtp_jax.generate).
"""
__version__ = "0.1.0"
