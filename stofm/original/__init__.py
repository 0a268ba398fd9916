"""The original SToFM, exactly, and the package's only implementation of it: its SE(2) transformer (``se2``: what
``stofm-original`` models, ``stofm convert`` and the pipeline build), the pipeline from raw coordinates to model
inputs (``pipeline``), its pretraining collator (``masking``), the Geneformer-token cell BERT (``cell_bert``: the
cell-encoder kind ``"geneformer"``) and loading of released checkpoints (``convert``).
Golden tests against outputs of the original code: ``tests/test_stofm_original.py``."""
