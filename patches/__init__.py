"""Deviations from upstream packages, one module per upstream package, each version-guarded.

Installed as ``alp_megatron._patches`` (see ``setup.py``); nothing here edits site-packages.
"""
