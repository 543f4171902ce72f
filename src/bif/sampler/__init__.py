"""Samplers as pure steps (``init`` → ``State``; ``step(state, ...)`` → ``(State, Info)``).

Randomness is an explicit input: the Gaussian noise is drawn by the caller and passed in, so a
step is a pure function of its arguments and every chain is reproducible from its own generator.
"""

from bif.sampler.kinetic import KineticState
from bif.sampler.kinetic import init as kinetic_init
from bif.sampler.kinetic import step as kinetic_step
from bif.sampler.mass import LowRankMass
from bif.sampler.rmsprop import RMSPropSGLDState
from bif.sampler.rmsprop import init as rmsprop_init
from bif.sampler.rmsprop import step as rmsprop_step
from bif.sampler.sgld import SGLDInfo, SGLDState
from bif.sampler.sgld import init as sgld_init
from bif.sampler.sgld import step as sgld_step

__all__ = [
    "KineticState",
    "LowRankMass",
    "RMSPropSGLDState",
    "SGLDInfo",
    "SGLDState",
    "kinetic_init",
    "kinetic_step",
    "rmsprop_init",
    "rmsprop_step",
    "sgld_init",
    "sgld_step",
]
