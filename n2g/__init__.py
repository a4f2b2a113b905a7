"""n2g: distil single neurons of transformer language models into token-pattern graphs.

``n2g.fit_neuron(n2g.load_model(), layer, index)`` fits one neuron of a real model (on the default
corpus, or one from ``n2g.load_corpus``); ``n2g.distill(feature, excerpts, **options)`` fits a
graph to any feature (a callable from token ids ``[batch, pos]`` to activations ``[batch, pos]``).
Both return the fitted :class:`~n2g.distill.NeuronModel`. The CLI (``n2g``) runs the same
pipeline on many neurons.
"""

from .api import feature_from_hook, fit_neuron, load_corpus, load_model
from .config import PRESETS, DistillConfig, preset
from .distill import NeuronModel, distill
from .errors import N2GError
from .graph import NeuronGraph
from .records import Example, NeuronId, NeuronResult, NeuronStats, Scores, Sign

__version__ = "0.1.0"

__all__ = [
    "load_model", "load_corpus", "fit_neuron", "feature_from_hook",
    "PRESETS", "DistillConfig", "preset", "NeuronModel", "distill", "N2GError", "NeuronGraph",
    "Example", "NeuronId", "NeuronResult", "NeuronStats", "Scores", "Sign", "__version__",
]
