"""Other attribution methods behind one interface, so evaluation never knows who made the scores.

Every attributor returns scores ``[Q, N]`` with bif's sign convention: a negative score means
training on example n LOWERS the query's observable (a proponent when that is the query loss).
"""

from bif.baselines.base import AttributionContext, Attributor

__all__ = ["AttributionContext", "Attributor"]
