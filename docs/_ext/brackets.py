"""Griffe extension for the API reference (mkdocs.yml): clbench's docstring notation rendered as written.

Two habits of the docstrings that Markdown would misread: matrix entries written as R[i][j], which Markdown
reads as a reference link ``[i][j]`` and mkdocs-autorefs then reports as a missing cross-reference target (an
error under ``mkdocs build --strict``), and Sphinx roles (``:class:`~clbench.schedule.PlateauSchedule```),
which would show as literal text. Outside code spans ``][`` becomes ``]\\[``, and a role becomes a code span
of its target (its last component after ``~``, as Sphinx shows it); the source keeps its plain notation.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|obj|exc):`(~?)([^`]+)`")


def _role_as_code(match: re.Match[str]) -> str:
    target = match.group(2).split(" <")[0]
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def escape_brackets(text: str) -> str:
    """``text`` with Sphinx roles as code spans and every ``][`` outside code spans escaped as ``]\\[``."""
    text = ROLE.sub(_role_as_code, text)
    parts, last = [], 0
    for span in CODE_SPAN.finditer(text):
        parts += [text[last : span.start()].replace("][", "]\\["), span.group(0)]
        last = span.end()
    parts.append(text[last:].replace("][", "]\\["))
    return "".join(parts)


class EscapeBrackets(Extension):
    """Applies :func:`escape_brackets` to every docstring as it is loaded."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = escape_brackets(obj.docstring.value)
