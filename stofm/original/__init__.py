"""The original SToFM, exactly: its SE(2) transformer (``se2``), the pipeline from raw coordinates to model inputs
(``pipeline``), the Geneformer-token cell BERT (``cell_bert``) and loading of released checkpoints (``convert``).
Golden tests against outputs of the original code: ``tests/test_stofm_original.py``."""
