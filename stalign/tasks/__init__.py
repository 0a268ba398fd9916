"""What users come for: zero-shot prediction by retrieval, retrieval queries, the HEST-Benchmark protocol,
baselines, few-shot probes and heads, zero-shot spatial domains, heat maps and whole-slide prediction.

Submodules import torch/sklearn/matplotlib lazily; import them directly, e.g.
``from stalign.tasks.retrieval import ReferenceBank``.
"""
