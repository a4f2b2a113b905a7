"""HTML pages from jinja2 templates (``n2g/templates/``) with autoescaping on.

Corpus text reaches the pages in many places; with autoescaping every ``{{ value }}`` is escaped
by default, so no call site has to remember to. Values that are already safe markup (an SVG made
by Graphviz from entity-escaped labels) are marked with :class:`markupsafe.Markup` by the caller.
"""

from __future__ import annotations

import functools

import jinja2
from markupsafe import Markup

from .render import display_token
from .report import fmt

__all__ = ["Markup", "render_page"]


def _pct(value, digits: int = 2) -> str:
    return "—" if value is None else f"{100 * float(value):.{digits}f} %"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("n2g", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["tok"] = display_token
    env.filters["pct"] = _pct
    return env


def render_page(template: str, **context) -> str:
    """Render ``n2g/templates/<template>`` with ``context`` (autoescaped)."""
    return environment().get_template(template).render(**context)
