"""n2g: distil single neurons of transformer language models into token-pattern graphs.

``n2g.distill(feature, excerpts, **options)`` fits a graph to any feature (a callable from token
ids ``[batch, pos]`` to activations ``[batch, pos]``) and returns the fitted
:class:`~n2g.distill.NeuronModel`. The CLI (``n2g``) runs the same pipeline on real models.
"""

from .config import PRESETS, DistillConfig, preset
from .distill import NeuronModel, distill
from .errors import N2GError
from .graph import NeuronGraph
from .records import Example, NeuronId, NeuronResult, NeuronStats, Scores, Sign

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "DistillConfig", "preset", "NeuronModel", "distill", "N2GError", "NeuronGraph",
    "Example", "NeuronId", "NeuronResult", "NeuronStats", "Scores", "Sign", "__version__",
]
