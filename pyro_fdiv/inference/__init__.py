"""Variational objectives that drop into ``pyro.infer.SVI(..., loss=...)``."""
