"""The science of the transient broker: plain Python on numpy, astropy, photutils and torch.

No Kafka here: each step is a function or a small class configured once and called per item.
"""

from pathlib import Path

__version__ = "0.1.0"

#: Folder of the shipped models: weights, JSON sidecars and Markdown cards of the real/bogus
#: (:mod:`broker.realbogus`) and anomaly (:mod:`broker.anomaly`) models. Package data
#: (``broker/models/``), so it is found the same way from a checkout, an editable install or an
#: installed wheel; the one definition both loaders use.
MODELS_DIR: Path = Path(__file__).resolve().parent / "models"
