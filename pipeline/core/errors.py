"""The one base class of the errors this project raises for a user's own mistake.

A command catches `PipelineError` (and `OSError`, which names its path) and prints one line;
anything else is a bug and shows its traceback. Each error keeps its older base too
(`ValueError`, `RuntimeError`, ...) so that callers that caught those still do.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix: bad input, configuration, a missing file, a store down."""
