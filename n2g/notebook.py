"""Notebook display of a fitted neuron model: the rendered graph, its scores and its strongest paths."""

from __future__ import annotations

from .pages import Markup, render_page
from .report import METHOD_NAMES, METHODS, f1_text


def model_html(model) -> str:
    """HTML for ``NeuronModel._repr_html_`` (the same in Jupyter, VS Code and a static HTML export)."""
    from .graph import shown_fixed
    from .render import dot_available, graph_paths, path_text, svg_of

    graph = getattr(model, "graph_", None)
    svg, paths = None, []
    if graph is not None:
        G = graph.drawable()
        if getattr(model, "sign", 1.0) < 0:  # its legend: normalised to the most negative value, not the maximum
            G.graph["neuron"] = {"sign": "negative"}
        paths = [{"text": path_text(p), "end": shown_fixed(p["end"], graph.fire_threshold), "count": p["count"]}
                 for p in graph_paths(G)]
        if dot_available() and paths:
            svg = Markup(svg_of(G, title=model.name))  # labels are entity-escaped by the renderer
    scores = getattr(model, "scores_", None) or {}
    rows = [{"name": METHOD_NAMES.get(m, m), "s": scores[m], "f1": f1_text(scores[m].f1, scores[m].status)}
            for m in [*(m for m in METHODS if m in scores), *sorted(set(scores) - set(METHODS))]]
    return render_page("notebook.html", name=model.name, status=getattr(model, "status_", "not fitted"),
                       scale=model.scale * getattr(model, "sign", 1.0), negative=getattr(model, "sign", 1.0) < 0, svg=svg, rows=rows, paths=paths[:15], n_paths=len(paths),
                       fitted=graph is not None)
