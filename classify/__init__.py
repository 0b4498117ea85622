"""Labels for a person's own clips from a few examples per class (`python cli.py classify`).

Phase one runs on the fly for the support and query clips, with the backbone recipe of the cache
the head was trained on (``encode``); phase two scores them through evaluate's per-video
precompute with a declared rule for any number of clips per class (``scoring``). The API is
``FewShotClassifier`` (``api``); ``command`` and ``report`` are the CLI's thin layer on it.

    clips.py     which files and folders are clips, their labels, their content keys
    encode.py    the cache's backbone recipe run on clips; the --features clip store
    scoring.py   logits for classes of any K (the K rule), through the precompute path
    api.py       FewShotClassifier: from_checkpoint / training_free, fit, predict, explain
    report.py    CSV / JSON, console table, accuracy and confusion, figures
    command.py   `python cli.py classify`
"""

from classify.api import FewShotClassifier, Prediction
from classify.clips import Clip

__all__ = ["Clip", "FewShotClassifier", "Prediction"]
