"""n2g: distil single neurons of transformer language models into token-pattern graphs.

``n2g.fit_neuron(n2g.load_model(), layer, index)`` fits one neuron of a real model (on the default
corpus, or one from ``n2g.load_corpus``); ``n2g.distill(feature, excerpts, **options)`` fits a
graph to any feature (a callable from token ids ``[batch, pos]`` to activations ``[batch, pos]``).
Both return the fitted :class:`~n2g.distill.NeuronModel`. The CLI (``n2g``) runs the same
pipeline on many neurons.

The names below are imported when first used, so ``import n2g`` (and every ``n2g`` command) starts
without loading torch until it needs it: ``n2g --help`` and a mistyped option answer at once, and
Ctrl-C while torch loads is the command's own one-line interruption.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "api", "load_corpus": "api", "fit_neuron": "api", "load_neuron": "api", "feature_from_hook": "api",
    "PRESETS": "config", "DistillConfig": "config", "preset": "config",
    "NeuronModel": "distill", "distill": "distill",
    "N2GError": "errors", "NeuronGraph": "graph",
    "Example": "records", "NeuronId": "records", "NeuronResult": "records", "NeuronStats": "records",
    "Scores": "records", "Sign": "records",
}

__all__ = [
    "load_model", "load_corpus", "fit_neuron", "load_neuron", "feature_from_hook",
    "PRESETS", "DistillConfig", "preset", "NeuronModel", "distill", "N2GError", "NeuronGraph",
    "Example", "NeuronId", "NeuronResult", "NeuronStats", "Scores", "Sign", "__version__",
]


class _Package(types.ModuleType):
    """The package: exports load on first use, and ``n2g.distill`` stays the function.

    Importing the submodule ``n2g.distill`` makes the import system set the package attribute of the
    same name to the module; that binding is dropped (the module stays in ``sys.modules``, which is
    where ``from n2g.distill import ...`` finds it), so the attribute is always the public function."""

    def __getattr__(self, name):
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
