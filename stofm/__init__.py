"""stofm: the SToFM gene/spatial foundation encoder (cell encoder + SE(2) transformer + virtual cells)."""
__version__ = "0.1.0"
