"""The one exception type for mistakes a user can make.

Library code raises :class:`N2GError` with a message that says what is wrong and what to do; the
CLI turns it into a one-line message on stderr and a non-zero exit code, never a traceback.
"""

import numbers


BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Invisible characters that reorder the text after them (right-to-left overrides and their kin): in a
token they would turn the rest of a label, table cell or terminal line around, so they are shown as
``\\u202e`` instead. Here, not in :mod:`n2g.render`, so that the command line's messages can show them
without importing networkx: an interrupt's own message must import nothing heavy (a Ctrl-C during that
import left it half done, and importing it again raised)."""


class N2GError(Exception):
    """A problem the user can fix (bad spec, missing file, out-of-range neuron, ...)."""


def not_unicode(text) -> str | None:
    """What makes ``text`` unencodable as UTF-8, or None when it is text: a lone surrogate, which is either
    an undecodable byte of a command-line argument or file name (Python's surrogateescape) or a ``\\ud800``
    escape in JSON."""
    if not isinstance(text, str):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        ch = text[exc.start]
        what = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"lone surrogate U+{ord(ch):04X}"
        return f"{what} at character {exc.start}"
    return None


def is_whole(value) -> bool:
    """Whether ``value`` is a whole number to check a count or id with: an int or NumPy integer, not a bool
    (NumPy's bool is no ``numbers.Integral`` either)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Whether ``value`` is a real number (an int, float or NumPy number), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
