"""HTML pages from jinja2 templates (``n2g/templates/``) with autoescaping on.

Corpus text reaches the pages in many places; with autoescaping every ``{{ value }}`` is escaped
by default, so no call site has to remember to. Values that are already safe markup (an SVG made
by Graphviz from entity-escaped labels) are marked with :class:`markupsafe.Markup` by the caller.
Every other text value also has its control characters shown as control pictures (``␛``) and its
bidirectional controls as ``\\u202e``: a run folder's text (a steering prompt, an example's source,
a model name) must not reorder or hide what the page shows.
"""

from __future__ import annotations

import functools

import jinja2
from markupsafe import Markup

from .render import BIDI_CONTROLS, display_token
from .report import fmt

__all__ = ["Markup", "render_page"]


def _pct(value, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * float(value):.{digits}f} %"


_VISIBLE = {**{i: 0x2400 + i for i in range(0x20) if chr(i) not in "\t\n\r"}, 0x7F: 0x2421,
            **{ord(c): f"\\u{ord(c):04x}" for c in BIDI_CONTROLS}}


def _visible(value):
    """A text value with its control and bidirectional characters made visible; markup and numbers as they are."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return value.translate(_VISIBLE)
    return value


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("n2g", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, finalize=_visible)
    env.filters["fmt"] = fmt
    env.filters["tok"] = display_token
    env.filters["pct"] = _pct
    return env


def render_page(template: str, **context) -> str:
    """Render ``n2g/templates/<template>`` with ``context`` (autoescaped)."""
    return environment().get_template(template).render(**context)
