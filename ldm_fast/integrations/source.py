"""Recognizing another library's code: the digest of a function's source.

A fused forward reproduces a library's block forward statement for statement; it may replace that
forward only where the installed source is one it was written for. :func:`digest` hashes a
canonical form of the function's syntax tree: formatting, comments, the docstring and type
annotations do not count (so a release that only modernizes its annotations keeps its digest), and
the form is the same on every Python from 3.9 on (``ast.dump``'s output is not: 3.13 omits empty
fields, 3.12 added ``type_params``).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import weakref
from typing import Callable, Optional

__all__ = ["canonical", "digest", "digest_of_source"]

#: Fields that do not change what a function computes (annotations, type comments, string kinds).
_IGNORED_FIELDS = frozenset({"annotation", "returns", "type_comment", "type_params", "kind"})


def canonical(node) -> str:
    """A canonical text of an AST: node types and their fields, without :data:`_IGNORED_FIELDS`,
    docstrings or source positions; an annotated assignment without a value is dropped."""
    if isinstance(node, list):
        body = [n for n in node if not (isinstance(n, ast.AnnAssign) and n.value is None)]
        if body and _is_docstring(body[0]):
            body = body[1:]
        return "[" + ",".join(canonical(n) for n in body) + "]"
    if isinstance(node, ast.AST):
        fields = ",".join(f"{name}={canonical(getattr(node, name, None))}" for name in node._fields
                          if name not in _IGNORED_FIELDS)
        return f"{type(node).__name__}({fields})"
    return repr(node)


def _is_docstring(node) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def digest_of_source(source: str) -> str:
    """The sha256 of :func:`canonical` of ``source`` (a function's code, indented or not)."""
    return hashlib.sha256(canonical(ast.parse(textwrap.dedent(source)).body).encode()).hexdigest()


_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # function -> digest (no leak)


def digest(fn: Optional[Callable]) -> Optional[str]:
    """:func:`digest_of_source` of ``fn``'s source, cached per function; None when ``fn`` is None or
    its source cannot be read."""
    if fn is None:
        return None
    fn = inspect.unwrap(fn) if not isinstance(fn, type) else fn
    try:
        return _DIGESTS[fn]
    except (KeyError, TypeError):
        pass
    try:
        value = digest_of_source(inspect.getsource(fn))
    except (OSError, TypeError, SyntaxError):
        value = None
    try:
        _DIGESTS[fn] = value
    except TypeError:  # not weak-referenceable
        pass
    return value
