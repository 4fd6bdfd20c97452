"""A small, safe expression language for ``skip_datapoints_expression``.

An expression is a Python *expression* restricted to a handful of node
types. It is parsed once (``ast.parse``), checked against a whitelist and
turned into a tree of small closures; nothing is ever handed to the Python
interpreter as code, so an expression can only read the names it is given
and compute with them::

    expr = compile_expression("metadata['flavor_name'] == 'm1.tiny' and qty < 1",
                              where="[collect] skip_datapoints_expression")
    expr.matches(point)          # True / False
    expr(qty=..., price=..., unit=..., groupby=..., metadata=...)

Names: ``qty`` and ``price`` (Decimals), ``unit`` (str), ``groupby`` and
``metadata`` (dicts of str). ``True``, ``False`` and ``None``.

Allowed:

* literals: strings, numbers (always read as ``decimal.Decimal`` from their
  source text, so ``0.1`` is exactly one tenth), ``True``/``False``/``None``,
  and tuples, lists and sets of allowed expressions (for ``in``);
* ``groupby['key']`` and ``metadata['key']`` (a missing key gives ``None``;
  only these two names can be subscripted);
* comparisons ``== != < <= > >= in not in is is not`` (chains too);
* ``and``, ``or``, ``not``; unary ``-``/``+``;
* arithmetic ``+ - * / %`` between numbers only (Decimal, 28 digits).

Refused at compile time (:class:`ExpressionError`, a ``ValueError``):
attribute access (``x.y``), calls (``f()``, ``__import__('os')``), any
other name, dunder names, lambdas, comprehensions, f-strings, ``**``,
``:=``, slices, conditional expressions, statements, and expressions over
:data:`MAX_LENGTH` characters or nested more than :data:`MAX_DEPTH` levels.

At run time an operation on values of the wrong type (``'a' < 1``,
``None > 2``, ``1 + 'x'``) raises :class:`ExpressionEvalError`; callers decide
what that means (the collectors keep the datapoint and log a warning).
"""

from __future__ import annotations

import ast
import decimal
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from cloudkitty_proc.exceptions import ConfigError

__all__ = [
    "NAMES",
    "Expression",
    "ExpressionError",
    "ExpressionEvalError",
    "compile_expression",
]

#: The names an expression may use.
NAMES = ("qty", "price", "unit", "groupby", "metadata")
#: Names that may be subscripted (``groupby['id']``).
SUBSCRIPTABLE = ("groupby", "metadata")
MAX_LENGTH = 1000
MAX_DEPTH = 50

_CONTEXT = decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)
_D = decimal.Decimal

_Env = Mapping[str, Any]
_Fn = Callable[[_Env], Any]


class ExpressionError(ValueError):
    """An expression that is not valid or not allowed."""


class ExpressionEvalError(Exception):
    """An expression failed on a datapoint (a type error, a division by 0)."""


_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}

_ARITH: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}

_WHY_NOT: dict[type, str] = {
    ast.Attribute: "attribute access is not allowed",
    ast.Call: "function calls are not allowed",
    ast.Lambda: "lambdas are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.NamedExpr: "assignments (:=) are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.FormattedValue: "f-strings are not allowed",
    ast.Starred: "* unpacking is not allowed",
    ast.Slice: "slices are not allowed",
    ast.IfExp: "conditional expressions are not allowed",
    ast.Dict: "dict literals are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
}


def _num(value: Any) -> bool:
    return isinstance(value, _D) and not isinstance(value, bool)


class _Compiler:
    def __init__(self, source: str) -> None:
        self.source = source
        self.arith = False
        self.depth = 0

    def fail(self, node: ast.AST, problem: str) -> ExpressionError:
        col = getattr(node, "col_offset", None)
        at = f" (at column {col + 1})" if col is not None else ""
        return ExpressionError(problem + at)

    def compile(self, node: ast.AST) -> _Fn:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            why = _WHY_NOT.get(type(node))
            if why is None:
                why = f"{type(node).__name__} is not allowed"
            raise self.fail(node, why)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(node, f"nested more than {MAX_DEPTH} levels deep")
        try:
            return method(node)
        finally:
            self.depth -= 1

    # -- leaves ----------------------------------------------------------
    def _Constant(self, node: ast.Constant) -> _Fn:
        value = node.value
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return lambda env, v=value: v
        if isinstance(value, (int, float)):
            text = ast.get_source_segment(self.source, node) or repr(value)
            try:
                number = _D(text.replace("_", ""))
            except decimal.InvalidOperation:
                number = _D(repr(value))
            if not number.is_finite():
                raise self.fail(node, f"not a finite number: {text}")
            return lambda env, v=number: v
        raise self.fail(node, f"{type(value).__name__} literals are not allowed")

    def _Name(self, node: ast.Name) -> _Fn:
        name = node.id
        if name.startswith("__"):
            raise self.fail(node, f"dunder name {name!r} is not allowed")
        if name not in NAMES:
            raise self.fail(node, f"unknown name {name!r} (allowed: "
                            f"{', '.join(NAMES)})")
        return lambda env, n=name: env[n]

    def _Tuple(self, node: ast.Tuple) -> _Fn:
        items = [self.compile(e) for e in node.elts]
        return lambda env: tuple(f(env) for f in items)

    def _List(self, node: ast.List) -> _Fn:
        items = [self.compile(e) for e in node.elts]
        return lambda env: [f(env) for f in items]

    def _Set(self, node: ast.Set) -> _Fn:
        items = [self.compile(e) for e in node.elts]
        return lambda env: {f(env) for f in items}

    def _Subscript(self, node: ast.Subscript) -> _Fn:
        target = node.value
        if not (isinstance(target, ast.Name) and target.id in SUBSCRIPTABLE):
            raise self.fail(node, "only groupby[...] and metadata[...] can be "
                            "subscripted")
        if isinstance(node.slice, ast.Slice):
            raise self.fail(node.slice, _WHY_NOT[ast.Slice])
        container = self.compile(target)
        key = self.compile(node.slice)

        def subscript(env: _Env) -> Any:
            mapping = container(env)
            k = key(env)
            try:
                return mapping.get(k)
            except TypeError:  # an unhashable key
                raise ExpressionEvalError(f"bad key {k!r}") from None
        return subscript

    # -- operators -------------------------------------------------------
    def _BoolOp(self, node: ast.BoolOp) -> _Fn:
        parts = [self.compile(v) for v in node.values]
        if isinstance(node.op, ast.And):
            def and_(env: _Env) -> Any:
                value = True
                for part in parts:
                    value = part(env)
                    if not value:
                        return value
                return value
            return and_

        def or_(env: _Env) -> Any:
            value = False
            for part in parts:
                value = part(env)
                if value:
                    return value
            return value
        return or_

    def _UnaryOp(self, node: ast.UnaryOp) -> _Fn:
        operand = self.compile(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda env: not operand(env)
        if isinstance(node.op, (ast.USub, ast.UAdd)):
            self.arith = True
            negate = isinstance(node.op, ast.USub)

            def sign(env: _Env) -> Any:
                value = operand(env)
                if not _num(value):
                    raise ExpressionEvalError(
                        f"unary {'-' if negate else '+'} on {type(value).__name__}")
                return -value if negate else +value
            return sign
        raise self.fail(node, f"operator {type(node.op).__name__} is not allowed")

    def _BinOp(self, node: ast.BinOp) -> _Fn:
        op = _ARITH.get(type(node.op))
        if op is None:
            raise self.fail(node, f"operator {type(node.op).__name__} is not "
                            "allowed (only + - * / %)")
        self.arith = True
        left = self.compile(node.left)
        right = self.compile(node.right)
        name = type(node.op).__name__

        def binop(env: _Env) -> Any:
            a = left(env)
            b = right(env)
            if not (_num(a) and _num(b)):
                raise ExpressionEvalError(
                    f"{name} of {type(a).__name__} and {type(b).__name__} "
                    "(arithmetic is between numbers only)")
            return op(a, b)
        return binop

    def _Compare(self, node: ast.Compare) -> _Fn:
        first = self.compile(node.left)
        steps = []
        for cmp_op, comparator in zip(node.ops, node.comparators):
            fn = _COMPARE.get(type(cmp_op))
            if fn is None:
                raise self.fail(node, f"comparison {type(cmp_op).__name__} is "
                                "not allowed")
            steps.append((fn, self.compile(comparator)))

        def compare(env: _Env) -> bool:
            a = first(env)
            for fn, right in steps:
                b = right(env)
                if not fn(a, b):
                    return False
                a = b
            return True
        return compare


class Expression:
    """A compiled expression; call it with the datapoint's values."""

    __slots__ = ("source", "_fn", "_arith")

    def __init__(self, source: str, fn: _Fn, arith: bool) -> None:
        self.source = source
        self._fn = fn
        self._arith = arith

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def evaluate(self, env: _Env) -> bool:
        """The truth of the expression for ``env``; ExpressionEvalError."""
        try:
            if self._arith:
                with decimal.localcontext(_CONTEXT):
                    return bool(self._fn(env))
            return bool(self._fn(env))
        except ExpressionEvalError:
            raise
        except (TypeError, ArithmeticError) as exc:
            raise ExpressionEvalError(str(exc) or type(exc).__name__) from None

    def __call__(self, *, qty: Any, price: Any, unit: Any,
                 groupby: Mapping, metadata: Mapping) -> bool:
        return self.evaluate({"qty": qty, "price": price, "unit": unit,
                              "groupby": groupby, "metadata": metadata})

    def matches(self, point: Any) -> bool:
        """For a :class:`~cloudkitty_proc.dataframe.DataPoint`."""
        return self.evaluate({"qty": point.qty, "price": point.price,
                              "unit": point.unit, "groupby": point.groupby,
                              "metadata": point.metadata})


#: CloudKitty's datapoint dict accessors and their names here: ``vol.qty``,
#: ``rating.price``, ``vol.unit``; ``groupby``/``metadata`` keep a key
_CK_FIELDS = {("vol", "qty"): "qty", ("rating", "price"): "price", ("vol", "unit"): "unit"}
_CK_STEP = (r"""(?:\.get\(\s*(?P<q{n}>["'])(?P<k{n}>[^"']*)(?P=q{n})\s*(?:,[^()]*(?:\(\))?)?\)"""
            r"""|\[\s*(?P<r{n}>["'])(?P<j{n}>[^"']*)(?P=r{n})\s*\])""")
_CK_ACCESS = re.compile(r"datapoint" + _CK_STEP.format(n=1) + _CK_STEP.format(n=2))


def cloudkitty_equivalent(source: str) -> str | None:
    """The expression of this language that CloudKitty's Python expression
    ``source`` (over a ``datapoint`` dict) means, when its accesses are the
    usual ones; None otherwise."""
    def replace(match: re.Match) -> str:
        outer = match.group("k1") if match.group("k1") is not None else match.group("j1")
        inner = match.group("k2") if match.group("k2") is not None else match.group("j2")
        if (outer, inner) in _CK_FIELDS:
            return _CK_FIELDS[(outer, inner)]
        if outer in SUBSCRIPTABLE:
            return f"{outer}[{inner!r}]"
        return match.group(0)

    text = _CK_ACCESS.sub(replace, source)
    if "datapoint" in text:
        return None
    try:
        parse_expression(text)
    except ExpressionError:
        return None
    return text


def parse_expression(source: str) -> Expression:
    """Compile ``source``; raises ExpressionError (a ValueError)."""
    if isinstance(source, str) and "datapoint" in source:
        equivalent = cloudkitty_equivalent(source)
        hint = (f"; the same here: {equivalent}" if equivalent else
                "; use the names qty, price, unit, groupby['key'], metadata['key']")
        raise ExpressionError("CloudKitty's Python expressions over 'datapoint' are not "
                              f"evaluated (no eval){hint}")
    if not isinstance(source, str):
        raise ExpressionError(f"must be a string, got {type(source).__name__}")
    text = source.strip()
    if not text:
        raise ExpressionError("empty expression")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"longer than {MAX_LENGTH} characters")
    try:
        # Parsed as a module that must hold exactly one expression
        # statement; only the AST is used.
        tree = ast.parse(text)
    except SyntaxError as exc:
        where = f" (at column {exc.offset})" if exc.offset else ""
        raise ExpressionError(f"syntax error: {exc.msg}{where}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ExpressionError("cannot be parsed (too deeply nested or "
                              "contains NUL characters)") from None
    body = tree.body
    if len(body) != 1:
        raise ExpressionError(f"must be a single expression (found "
                              f"{len(body)} statements)")
    if not isinstance(body[0], ast.Expr):
        raise ExpressionError(f"must be an expression, not a "
                              f"{type(body[0]).__name__} statement")
    compiler = _Compiler(text)
    try:
        fn = compiler.compile(body[0].value)
    except RecursionError:
        raise ExpressionError("too deeply nested") from None
    return Expression(text, fn, compiler.arith)


def compile_expression(source: str, *, where: str) -> Expression:
    """Compile ``source``; ConfigError naming ``where`` if it is refused."""
    try:
        return parse_expression(source)
    except ExpressionError as exc:
        raise ConfigError(f"{where}: invalid expression {source!r}: "
                          f"{exc}") from None
