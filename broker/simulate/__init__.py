"""Seeded sky simulator: realistic raw frames of a few fields and filters, each with its truth.

>>> sim = SkySimulator(SimConfig(shape=(512, 512), n_stars=300), seed=1)
>>> frame, truth = sim.frame("F001", "r", 3)       # doctest: +SKIP
>>> [i for i in truth.injections if i.kind == "transient"]  # doctest: +SKIP

The static sky of a field (stars from a power-law luminosity function with colours, Sersic
galaxies, variable stars) is drawn from (seed, field); each frame adds its own seeing (Moffat),
pointing jitter and rotation (through the TAN WCS), sky level and gradient, transients (from
``reference_epochs`` on), moving objects, cosmic rays, the telescope's fixed hot pixels and
columns, sometimes a satellite trail, then Poisson and read noise, ADC rounding and saturation.
"""

from broker.simulate.config import SimConfig
from broker.simulate.population import field_centre
from broker.simulate.render import moffat_stamps, optimal_snr
from broker.simulate.simulator import KINDS, Injection, SkySimulator, Truth

__all__ = ["KINDS", "Injection", "SimConfig", "SkySimulator", "Truth", "field_centre",
           "moffat_stamps", "optimal_snr"]
