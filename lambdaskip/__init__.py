"""lambdaskip: λ-skip connections and rank collapse in attention and state space models.

Companion package of the executable book on Joseph, Sieber, Zeilinger & Amo Alonso,
"Lambda-Skip Connections: the architectural component that prevents Rank Collapse" (ICLR 2025).

Modules: :mod:`~lambdaskip.metrics` (μ and friends), :mod:`~lambdaskip.norms`,
:mod:`~lambdaskip.mixers` (token mixers as mixing matrices), :mod:`~lambdaskip.blocks` (λ-skip
blocks and stacks), :mod:`~lambdaskip.experiments`, :mod:`~lambdaskip.plotting`,
:mod:`~lambdaskip.profiles` (size profiles, device, seeds).
"""
__version__ = "0.1.0"

from . import metrics, mixers, norms  # noqa: E402
from .blocks import LambdaSkipBlock, LambdaSkipStack  # noqa: E402
from .metrics import mu, normalized_mu  # noqa: E402
from .mixers import available_mixers, make_mixer  # noqa: E402
from .profiles import by_profile, current_profile, setup  # noqa: E402

__all__ = [
    "__version__",
    "metrics",
    "mixers",
    "norms",
    "LambdaSkipBlock",
    "LambdaSkipStack",
    "mu",
    "normalized_mu",
    "available_mixers",
    "make_mixer",
    "by_profile",
    "current_profile",
    "setup",
]
