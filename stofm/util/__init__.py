"""Utilities below both ``stofm`` and ``stalign``: the training engine (``train_engine``: the one optimizer-step loop
of ``stalign train``, ``stofm pretrain`` and masked-gene pretraining) with its checkpoint folders, run logs,
optimiser and schedule; YAML run configs, the command-line error handler and the spot/cell kNN.

They live here, inside the lower package, so that ``stofm`` stands alone (it never imports ``stalign``) while
``stalign``'s training loop, commands and data preparation share the same code. Nothing here imports the rest of
``stofm`` or anything of ``stalign``.
"""
