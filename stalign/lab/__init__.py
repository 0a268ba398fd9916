"""The lab: what the project is shown and measured with, not what users run on their slides.

Synthetic slides with a known image -> expression link (``synth*.py``, ``stalign data synth``), the ablation of
niche images, three-target fusion and the gene side on them (``ablation.py``, ``ablation_eval.py``,
``benchmarks/ablation.py``) and the stages of ``make demo`` (``demo_stages.py``, ``demo_ablation.py``; the command
is ``stalign.commands.demo``).

Layer: above ``stalign.tasks``, below ``stalign.commands``; nothing in data, stofm, models, training or tasks
imports it.
"""
