"""The science of the transient broker: plain Python on numpy, astropy, photutils and torch.

No Kafka here: each step is a function or a small class configured once and called per item.
"""

__version__ = "0.1.0"
