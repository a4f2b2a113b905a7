"""A one-paragraph summary of a neuron, written from its graph and statistics by a template (no LLM).

What it fires on, how strongly, in which contexts, and what suppresses it, then how well the graph
predicts held-out text. The paragraph is a list of segments (plain text, or token text to be set
in code type) so pages escape and style it without parsing anything back.
"""

from __future__ import annotations

import re

import networkx as nx

from .records import NeuronResult
from .graph import fires, shown_fixed, token_value_count
from .render import graph_fire_threshold, graph_paths, path_text


def _seg(text: str, code: bool = False) -> dict:
    return {"t": text, "code": code}


def _listing(items: list[list[dict]], more: int = 0) -> list[dict]:
    out: list[dict] = []
    for k, item in enumerate(items):
        if k:
            out.append(_seg(" and " if k == len(items) - 1 and not more else ", "))
        out.extend(item)
    if more:
        out.append(_seg(f" and {more} other token{'s' if more > 1 else ''}"))
    return out


def _where(path: dict) -> str:
    """How the context of a path sits before its activator, in words."""
    lo = hi = 0  # how far back the first context token may stand
    for token, kind in zip(path["tokens"][1:], path["kinds"][1:]):
        span = re.fullmatch(r"\*\{0-(\d+)\}", token) if kind == "wildcard" else None
        if span:  # a wildcard run of 0..k tokens
            hi += int(span.group(1))
            continue
        lo, hi = lo + 1, hi + 1
        if kind in ("context", "start"):  # "⟨start⟩ right before it": the text's first token
            if lo == hi:
                return "right before it" if lo == 1 else f"{lo} tokens before it"
            return f"anywhere in the {hi} tokens before it" if lo == 1 else f"{lo} to {hi} tokens before it"
    return ""


def summary(result: NeuronResult, G: nx.DiGraph | None, threshold: float | None = None) -> list[dict]:
    """The summary paragraph of one neuron as segments ``{"t": text, "code": bool}``; it fires at ``threshold``,
    by default the graph's own fire threshold (:func:`n2g.render.graph_fire_threshold`)."""
    if threshold is None:
        threshold = graph_fire_threshold(G)

    def num(value: float) -> str:  # two decimals on the value's own side of the threshold
        return shown_fixed(value, threshold)

    key = result.neuron.key
    st = result.stats
    if result.status == "dead" or not st.max_activation > 0:
        side = "negative" if result.neuron.sign.value == "negative" else "positive"
        return [_seg(f"{key} never fires on the {side} side over the scanned corpus (its maximum there is "
                     "0), so it has no graph.")]
    paths = graph_paths(G) if G is not None else []
    firing = [p for p in paths if fires(p["end"], threshold)]
    # quiet context rules ("any token after Y is quiet"): they silence every activator
    silencing = [p for p in paths if not fires(p["end"], threshold) and len(p["nodes"]) > 1
                 and G.nodes[p["nodes"][0]].get("token_id") is None] if firing else []
    # a dense neuron's base ("[*]" alone fires): its quiet one-token paths are exceptions, most seen first
    dense = any(len(p["nodes"]) == 1 and G.nodes[p["nodes"][0]].get("token_id") is None for p in firing)
    exceptions = sorted((p for p in paths if dense and len(p["nodes"]) == 1 and not fires(p["end"], threshold)
                         and G.nodes[p["nodes"][0]].get("token_id") is not None), key=lambda p: -p.get("count", 0))
    out: list[dict] = []
    if not firing:
        out.append(_seg(f"The graph of {key} predicts no firing token: none of its {len(paths)} paths reaches "
                        f"{threshold:g} of the maximum, so it predicts the neuron quiet everywhere."))
    else:
        def act(p: dict) -> str:  # a context activator ("any token after Y") has no token of its own
            return "any token" if G.nodes[p["nodes"][0]].get("token_id") is None else p["tokens"][0]

        acts: dict[str, float] = {}
        for p in firing:
            tok = act(p)
            acts[tok] = max(acts.get(tok, 0.0), p["end"])
        ranked = list(dict.fromkeys(act(p) for p in firing))
        top = ranked[:3]
        out.append(_seg(f"{key} fires on "))
        out.extend(_listing([[_seg(t, True), _seg(f" ({num(acts[t])})")] for t in top], len(ranked) - len(top)))
        if exceptions:  # a dense neuron: any token fires, these are its exceptions
            out.append(_seg(" but is quiet on "))
            out.extend(_listing([[_seg(p["tokens"][0], True)] for p in exceptions[:3]], len(exceptions) - len(exceptions[:3])))
        with_ctx = [p for p in firing if "context" in p["kinds"] or "start" in p["kinds"]]
        bare = {act(p) for p in firing if len(p["nodes"]) == 1}
        if with_ctx:
            p = with_ctx[0]
            ctx = next(t for t, k in zip(p["tokens"], p["kinds"]) if k in ("context", "start"))
            out.append(_seg(", in contexts such as "))
            out.append(_seg(ctx, True))
            out.append(_seg(f" {_where(p)} ("))
            out.append(_seg(path_text(p), True))
            out.append(_seg(f": {num(p['end'])})"))
            if bare:
                alone = [t for t in ranked if t in bare][:2]
                out.append(_seg("; "))
                out.extend(_listing([[_seg(t, True)] for t in alone]))
                out.append(_seg(" also fire" + ("s" if len(alone) == 1 else "") + ("" if silencing else " whatever precedes "
                                + ("it" if len(alone) == 1 else "them"))))
        elif bare and not silencing:
            out.append(_seg(", whatever precedes them"))
        out.append(_seg(". "))
    if result.neuron.sign.value == "negative":  # raw as the model computes it: the side's extreme is below 0
        out.append(_seg(f"Its most negative activation on the corpus is {-st.max_activation:.4g} (raw); values here "
                        f"are normalised to it (1 = that extreme) unless marked raw. "))
    else:
        out.append(_seg(f"Its strongest activation on the corpus is {st.max_activation:.4g} (raw); values here "
                        f"are normalised to it (1 = that maximum) unless marked raw. "))
    if st.n_sampled_tokens:
        out.append(_seg(f"It fires (normalised activation ≥ {threshold:g}) on {100 * st.firing_rate:.2f} % of "
                        f"{st.n_sampled_tokens:,} sampled corpus tokens. "))
    firing_acts = {p["nodes"][0] for p in firing}
    quiet = silencing + [p for p in paths if not fires(p["end"], threshold) and len(p["nodes"]) > 1 and p["nodes"][0] in firing_acts
                         and p not in silencing]
    if quiet:
        p = quiet[0]
        out.append(_seg("It is suppressed in some contexts: "))
        out.append(_seg(path_text(p), True))
        out.append(_seg(f" is predicted only {num(p['end'])}"))
        if len(quiet) > 1:
            out.append(_seg(f" ({len(quiet) - 1} more such context{'s' if len(quiet) > 2 else ''} in the path table)"))
        out.append(_seg(". "))
    elif firing:
        out.append(_seg("No context in the graph suppresses an activating token. "))
    wild = [p for p in paths if len(p["nodes"]) == 1 and G.nodes[p["nodes"][0]].get("token_id") is None]
    graded = [p for p in paths if len(p["nodes"]) == 1 and not fires(p["end"], threshold) and p["nodes"][0] not in firing_acts
              and p not in wild and p not in exceptions]
    # above or below zero as the value reads: -0.0001 reads 0.00, which is neither "mildly active" nor "below zero"
    mild = sorted((p for p in graded if float(num(p["end"])) > 0), key=lambda p: -p["end"])
    low = sorted((p for p in graded if float(num(p["end"])) < 0), key=lambda p: p["end"])
    if mild or low:  # quiet activators: graded values below the firing threshold
        out.append(_seg("Below its firing threshold the graph also holds graded values: "))
        if mild:
            out.append(_seg("mildly active on "))
            out.extend(_listing([[_seg(p["tokens"][0], True), _seg(f" ({num(p['end'])})")] for p in mild[:3]],
                                len(mild) - len(mild[:3])))
        if low:
            out.append(_seg("; " if mild else ""))
            out.append(_seg("below zero on "))
            out.extend(_listing([[_seg(p["tokens"][0], True), _seg(f" ({num(p['end'])})")] for p in low[:2]],
                                len(low) - len(low[:2])))
        out.append(_seg(". "))
    if wild and not fires(wild[0]["end"], threshold):  # the background value: [*] alone
        own = token_value_count(G)
        if own:
            out.append(_seg(f"Any other token is predicted at its own training mean where no path matched it "
                            f"({own:,} tokens, all below the firing threshold), and one the training text never "
                            f"showed there at {num(wild[0]['end'])}, the training mean of the tokens no path matches. "))
        else:
            out.append(_seg(f"Any other token is predicted at {num(wild[0]['end'])}, the training mean of the tokens "
                            "no path matches. "))
    s = result.scores.get("n2g")
    if s is not None:
        base = result.scores.get("token_lookup")
        if s.f1 is None:
            out.append(_seg("No held-out test token fires, so the graph's firing F1 is undefined"))
            joint = "; its predictions correlate"
        else:
            out.append(_seg(f"On held-out excerpts the graph predicts firing with F1 {s.f1:.2f}"
                            + (f" (token lookup {base.f1:.2f})" if base is not None and base.f1 is not None else "")))
            joint = " and correlates"
        if s.pearson is not None:
            out.append(_seg(f"{joint} with the true activation at r = {s.pearson:.2f}"))
        out.append(_seg("."))
    c = result.ceiling or {}
    unseen = c.get("n_firing", 0) - c.get("n_seen", 0)
    if unseen > 0 and c.get("f1") is not None:
        out.append(_seg(f" {unseen} of its {c['n_firing']} held-out firing tokens {'is a token' if unseen == 1 else 'are tokens'} that never fire{'s' if unseen == 1 else ''} in the "
                        f"training text, which no rule learned from that text alone recalls: a lookup keyed on its tokens "
                        f"scores at most F1 {c['f1']:.2f} here (the graph passes that only where the model's variants or "
                        f"written text showed such a token firing)."))
    return out


def summary_text(result: NeuronResult, G: nx.DiGraph | None, threshold: float | None = None) -> str:
    """The summary paragraph as plain text."""
    return "".join(s["t"] for s in summary(result, G, threshold)).strip()
