"""Utilities below both ``stofm`` and ``stalign``: checkpoint folders, run logs, optimiser and schedule, YAML run
configs, the command-line error handler and the spot/cell kNN.

They live here, inside the lower package, so that ``stofm`` stands alone (it never imports ``stalign``) while
``stalign``'s training loop, commands and data preparation share the same code. Nothing here imports the rest of
``stofm`` or anything of ``stalign``.
"""
