"""The episode shape every phase-two command defaults to, declared once.

K = 5 (``DEFAULT_SHOT``): train-heads' and the README's default, and the 5-shot setting of the
paper's main table. N = 5 (``DEFAULT_WAY``): the paper's 5-way episodes. train-heads, evaluate,
sweep, analyze embedding, the episode sampler and the run records (align/runs.py) import these;
a run's own K / N, recorded in its config, wins over them where a command reads a run.

The option declarations themselves (``option``, ``Range``, ``options_from``) live in
cache/options.py, the lowest layer with configs (extract's use them too).
"""

DEFAULT_SHOT = 5
DEFAULT_WAY = 5
