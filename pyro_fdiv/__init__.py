"""pyro_fdiv: importance-weighted, alpha- and f-divergence objectives for Pyro's SVI."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
