"""Theory: the constants and bounds of the guarantee (``bounds``) and the necessity results
(``necessity``: consensus lemma, the 2-token example) as executable functions."""
from .bounds import *  # noqa: F401,F403
from .necessity import *  # noqa: F401,F403
