"""MkDocs hook and Griffe extension (mkdocs.yml): clbench's notation renders as written on the site.

Two habits of clbench's text that Markdown would misread: matrix entries written as R[i][j], which Markdown
reads as a reference link ``[i][j]`` and mkdocs-autorefs then reports as a missing cross-reference target (an
error under ``mkdocs build --strict``), and, in docstrings, Sphinx roles
(``:class:`~clbench.schedule.PlateauSchedule```), which would show as literal text. Outside code, an index
bracket after ``]`` (short, no dot, so never an autorefs identifier such as ``[clbench.strategy.Strategy]``)
is escaped, and a role becomes a code span of its target (its last component after ``~``, as Sphinx shows
it). Pages (``on_page_markdown``) and docstrings (:class:`EscapeBrackets`) keep their plain notation in the
source; GitHub renders it as written too.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
INDEX = re.compile(r"\]\[(?=[^\].\n]{1,10}\])")
ROLE = re.compile(r":(?:class|mod|func|meth|attr|data|obj|exc):`(~?)([^`]+)`")


def _role_as_code(match: re.Match[str]) -> str:
    target = match.group(2).split(" <")[0]
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def _escape_indices(text: str) -> str:
    return INDEX.sub("]\\\\[", text)


def escape_brackets(text: str) -> str:
    """``text`` with Sphinx roles as code spans and index brackets outside code spans escaped (``]\\[``)."""
    text = ROLE.sub(_role_as_code, text)
    parts, last = [], 0
    for span in CODE_SPAN.finditer(text):
        parts += [_escape_indices(text[last : span.start()]), span.group(0)]
        last = span.end()
    parts.append(_escape_indices(text[last:]))
    return "".join(parts)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs hook: :func:`escape_brackets` on every page, line by line, outside fenced code blocks."""
    lines, fenced = [], False
    for line in markdown.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        lines.append(line if fenced or line.lstrip().startswith(("```", "~~~")) else escape_brackets(line))
    return "".join(lines)


class EscapeBrackets(Extension):
    """Applies :func:`escape_brackets` to every docstring as it is loaded."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = escape_brackets(obj.docstring.value)
