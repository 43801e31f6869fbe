"""The recipes: one file per recipe, each `get_config(arg=None)` -> ml_collections.ConfigDict.

Installed as `mtp_jax.recipes`; load one by name or path with `mtp_jax.config.load("default:n1")`.
"""
