"""The one exception type for mistakes a user can make.

Library code raises :class:`N2GError` with a message that says what is wrong and what to do; the
CLI turns it into a one-line message on stderr and a non-zero exit code, never a traceback.
"""


class N2GError(Exception):
    """A problem the user can fix (bad spec, missing file, out-of-range neuron, ...)."""
