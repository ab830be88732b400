"""Griffe extension for the API reference (mkdocs.yml): matrix entries in docstrings stay text.

clbench's docstrings write matrix entries as R[i][j], which Markdown reads as a reference link ``[i][j]``
and mkdocs-autorefs then reports as a missing cross-reference target, an error under ``mkdocs build
--strict``. Outside code spans, ``][`` becomes ``]\\[``, so the entry renders as written; the source keeps
its plain notation.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)


def escape_brackets(text: str) -> str:
    """``text`` with every ``][`` outside code spans escaped as ``]\\[``."""
    parts, last = [], 0
    for span in CODE_SPAN.finditer(text):
        parts += [text[last : span.start()].replace("][", "]\\["), span.group(0)]
        last = span.end()
    parts.append(text[last:].replace("][", "]\\["))
    return "".join(parts)


class EscapeBrackets(Extension):
    """Escapes ``][`` in every docstring as it is loaded."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = escape_brackets(obj.docstring.value)
