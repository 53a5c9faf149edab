"""Expressions over alerts: the schema's field paths, filters and projections.

:class:`AlertFilter` evaluates a user's boolean expression (simpleeval, on an AST whitelist) over
the alert's fields, by flat name (``snr``) or dotted path (``source.snr``), and over its detection
history (``ndet('r') >= 2``); :class:`FieldSelection` projects an alert on dotted paths
(``docs/architecture.md``, "Subscribing").
"""

from __future__ import annotations

import ast
import json
import logging
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeGuard

from simpleeval import (
    DEFAULT_OPERATORS,
    EvalWithCompoundTypes,
    InvalidExpression,
    IterableTooLong,
    NumberTooHigh,
    safe_mult,
)

import schemas
from broker.errors import ConfigError, FilterExpressionError

log = logging.getLogger(__name__)


# --- names and paths of the alert schema ------------------------------------------------------------


def _walk(node: Any, prefix: str, named: dict[str, Any], out: set[str]) -> None:
    """Add to ``out`` the dotted path of every field under the Avro type ``node``."""
    if isinstance(node, str):
        node = named.get(node.rsplit(".", 1)[-1], node)
        if isinstance(node, str):
            return
    if isinstance(node, list):
        for branch in node:
            _walk(branch, prefix, named, out)
        return
    if node.get("type") == "array":
        _walk(node["items"], prefix, named, out)
        return
    if node.get("type") != "record":
        return
    named[node["name"].rsplit(".", 1)[-1]] = node
    for f in node["fields"]:
        path = f"{prefix}.{f['name']}" if prefix else f["name"]
        out.add(path)
        _walk(f["type"], path, named, out)


@lru_cache(maxsize=1)
def alert_paths() -> frozenset[str]:
    """Dotted path of every field of every alert schema version (``source.snr``, ``prv_sources.mjd``)."""
    out: set[str] = set()
    for version in schemas.versions("alert"):
        _walk(json.loads((schemas.ROOT / "alert" / f"v{version}.avsc").read_text()), "", {}, out)
    return frozenset(out)


def _flat_names() -> dict[str, str]:
    """Short names a filter may use for a dotted path: source and score fields, object and ids."""
    paths = alert_paths()
    flat = {p.split(".", 1)[1]: p for p in paths if p.count(".") == 1 and p.split(".")[0] in ("source", "scores")}
    flat.update({"ndet": "object.ndet", "first_mjd": "object.first_mjd", "telescope": "provenance.telescope",
                 "field": "provenance.field", "class_label": "classification.label"})
    flat.update({p: p for p in paths if "." not in p})
    return flat


def lookup(alert: Any, path: str) -> Any:
    """The value at dotted ``path`` of ``alert``; lists map over their items; null where absent."""
    value = alert
    for part in path.split("."):
        if isinstance(value, list):
            value = [v.get(part) if isinstance(v, dict) else None for v in value]
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def _path_getter(path: str) -> Callable[[dict], Any]:
    """A function of an alert giving the value at ``path``."""
    return lambda alert: lookup(alert, path)


def _latency(alert: dict) -> float | None:
    """Seconds from shutter close to the alert's creation."""
    t = alert.get("timing") or {}
    return t["alert_time"] - t["exposure_end"] if is_num(t.get("alert_time")) and is_num(t.get("exposure_end")) \
        else None


def _class_probability(alert: dict) -> float | None:
    """The probability of the alert's most probable class (``classification.label``); null without a class.

    As TAP's ``broker.alerts`` and REST's alert summary answer ``class_probability``.
    """
    label, probabilities = lookup(alert, "classification.label"), lookup(alert, "classification.probabilities")
    value = probabilities.get(label) if isinstance(label, str) and isinstance(probabilities, dict) else None
    return value if is_num(value) else None


#: Names a filter may use that are computed from the alert, not read at one path.
_DERIVED: dict[str, Callable[[dict], Any]] = {"latency": _latency, "class_probability": _class_probability}


def is_num(x: object) -> TypeGuard[int | float]:
    """Whether ``x`` is a number (int or float, not bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool)


# --- the detection history ----------------------------------------------------------------------------


def _entries(alert: dict, key: str, band: object) -> list[float]:
    """MJDs of the entries of the history list ``key`` (e.g. ``prv_sources``) in ``band`` (None: all)."""
    if band is not None and not isinstance(band, str):
        raise TypeError(f"a band is a string, not {type(band).__name__}")
    items = alert.get(key)
    return [float(h["mjd"]) for h in items if isinstance(h, dict) and is_num(h.get("mjd"))
            and (band is None or h.get("filter") == band)] if isinstance(items, list) else []


def _detections(alert: dict, band: object, this_one: bool = True) -> list[float]:
    """MJDs of the detections of the alert's object in ``band`` (None: all): the history, and this one."""
    mjds = _entries(alert, "prv_sources", band)
    src = alert.get("source") or {}
    if this_one and is_num(src.get("mjd")) and (band is None or src.get("filter") == band):
        mjds.append(float(src["mjd"]))
    return mjds


def _history_functions(current: Callable[[], dict]) -> dict[str, Callable[..., Any]]:
    """The functions a filter may call, reading the alert being evaluated from ``current()``."""

    def ndet(band: object = None) -> int:
        return len(_detections(current(), band))

    def nprev(band: object = None) -> int:
        return len(_detections(current(), band, this_one=False))

    def since_first(band: object = None) -> float | None:
        mjds, now = _detections(current(), band), lookup(current(), "source.mjd")
        return now - min(mjds) if mjds and is_num(now) else None

    def since_last(band: object = None) -> float | None:
        now = lookup(current(), "source.mjd")
        before = [m for m in _detections(current(), band) if is_num(now) and m < now]
        return now - max(before) if before else None

    def nnondet(band: object = None) -> int:
        return len(_entries(current(), "prv_nondetections", band))

    def since_nondet(band: object = None) -> float | None:
        now = lookup(current(), "source.mjd")
        before = [m for m in _entries(current(), "prv_nondetections", band) if is_num(now) and m < now]
        return now - max(before) if before else None

    def nbands() -> int:
        bands = {h.get("filter") for h in current().get("prv_sources") or [] if isinstance(h, dict)}
        return len((bands | {lookup(current(), "source.filter")}) - {None})  # a null filter is no band

    def sep(ra: object, dec: object) -> float | None:
        return _separation_arcsec(lookup(current(), "source.ra"), lookup(current(), "source.dec"), ra, dec)

    return {"ndet": ndet, "nprev": nprev, "since_first": since_first, "since_last": since_last, "nbands": nbands,
            "nnondet": nnondet, "since_nondet": since_nondet, "sep": sep, "abs": abs, "min": min, "max": max,
            "len": len}


def _separation_arcsec(ra1: object, dec1: object, ra2: object, dec2: object) -> float | None:
    """Angle (arcsec) between two positions (deg); None when either is missing, TypeError for a non-number."""
    if not (is_num(ra2) and is_num(dec2)):
        raise TypeError("sep(ra, dec) takes two numbers in degrees")
    if not (is_num(ra1) and is_num(dec1)):
        return None
    a1, d1, a2, d2 = (math.radians(float(v)) for v in (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((a2 - a1) / 2) ** 2
    return math.degrees(2 * math.asin(math.sqrt(min(1.0, max(0.0, h))))) * 3600.0


#: What each filter function returns (shown by ``broker subscribe --help`` and the docs).
FUNCTIONS_HELP = {
    "ndet(band)": "detections of the object in band (this one included; no band: all bands)",
    "nprev(band)": "previous detections in band (the history attached to the alert, at most 100)",
    "since_first(band)": "days from the first detection in band to this one",
    "since_last(band)": "days from the previous detection in band to this one (null without one)",
    "nbands()": "distinct bands with a detection",
    "nnondet(band)": "frames in band that covered the object without detecting it (alert v2 upper limits)",
    "since_nondet(band)": "days from the last such non-detection in band to this one (null without one)",
    "sep(ra, dec)": "arcsec from (ra, dec), in degrees, to this detection (a cone: sep(150.1, 2.2) < 60)",
    "abs, min, max, len": "as in Python",
}

# --- filters ------------------------------------------------------------------------------------------

_ALLOWED_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
                  ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.Compare,
                  ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot,
                  ast.Constant, ast.Name, ast.Load, ast.Tuple, ast.List, ast.IfExp, ast.Call, ast.Attribute)


#: Most positional arguments of each filter function (others: 1).
_ARITY = {"nbands": 0, "sep": 2, "min": 8, "max": 8}
#: Deepest nesting of a filter's syntax tree: deeper ones would exhaust Python's recursion in the evaluator.
MAX_DEPTH = 64
#: Largest magnitude of a power's result (bits): ``9 ** 4000000``, which simpleeval allows, takes seconds.
MAX_POWER_BITS = 4096


def _bounded_power(base: Any, exponent: Any) -> Any:
    """``base ** exponent``, refused (NumberTooHigh) when the result would pass :data:`MAX_POWER_BITS` bits."""
    if is_num(base) and is_num(exponent) and abs(base) > 1 and exponent > 0:
        bits = float(exponent) * math.log2(abs(base))
        if bits > MAX_POWER_BITS:
            raise NumberTooHigh(f"{base!r} ** {exponent!r} is too large (over {MAX_POWER_BITS} bits)")
    return base**exponent


def _numeric_mod(left: Any, right: Any) -> Any:
    """``left % right`` of numbers; refused (NumberTooHigh) for a string: printf formatting can make gigabytes."""
    if isinstance(left, str | bytes):
        raise NumberTooHigh("'%' formats strings in Python; a filter uses it only on numbers")
    return left % right


#: Most items a filter may build by repeating a list or tuple, counted through nested ones: simpleeval walks
#: every value it makes, so ``[[[1] * 99] * 99] * 99`` would cost it 10**6 steps per node.
MAX_ITEMS = 10_000


def _items(value: Any) -> int:
    """Items of a list or tuple counted through nested ones (0 for a scalar); the count stops past MAX_ITEMS."""
    count, stack = 0, [value]
    while stack and count <= MAX_ITEMS:
        item = stack.pop()
        if isinstance(item, list | tuple):
            count += len(item)
            stack.extend(item)
    return count


def _bounded_mult(left: Any, right: Any) -> Any:
    """``left * right``, refused (IterableTooLong) when a repeated list would hold over :data:`MAX_ITEMS` items."""
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, list | tuple) and is_num(times) and times > 1 and _items(seq) * times > MAX_ITEMS:
            raise IterableTooLong(f"a list repeated to over {MAX_ITEMS} items")
    return safe_mult(left, right)


#: Most items simpleeval may walk in one evaluation, counted through every value of every node (count): it
#: checks each value a node makes, so a filter making many lists, or passing one through many nodes, would
#: cost a second per alert within :data:`MAX_ITEMS` and :data:`MAX_DEPTH`; an alert's history lists are ~2,000.
MAX_WALK = 10_000


class _Evaluator(EvalWithCompoundTypes):
    """simpleeval's evaluator, refusing (IterableTooLong) an evaluation that walks over :data:`MAX_WALK` items."""

    walked = 0

    def eval(self, expr: str, previously_parsed: Any = None) -> Any:
        """The value of ``expr``, with the items walked counted from zero."""
        self.walked = 0
        return super().eval(expr, previously_parsed)

    def _check_disallowed_items(self, item: Any) -> None:
        self.walked += 1
        if self.walked > MAX_WALK:
            raise IterableTooLong(f"the values of this filter hold over {MAX_WALK} items")
        super()._check_disallowed_items(item)


#: simpleeval's operators, with powers, repetitions and '%' bounded.
_OPERATORS = {**DEFAULT_OPERATORS, ast.Pow: _bounded_power, ast.Mult: _bounded_mult, ast.Mod: _numeric_mod}


def _depth(tree: ast.AST) -> int:
    """The depth of a syntax tree (counted without recursion, so that any depth can be measured)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


class _Dotted(ast.NodeTransformer):
    """Turn ``source.snr`` (attribute chains of plain names) into the single name ``'source.snr'``."""

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:  # noqa: N802  (ast's naming)
        """Replace a chain of plain names by one name; refuse attributes of anything else."""
        parts: list[str] = [node.attr]
        value: ast.expr = node.value
        while isinstance(value, ast.Attribute):
            parts.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name):
            raise FilterExpressionError("filter expression not allowed: attributes only of alert fields")
        if any(p.startswith("_") for p in [value.id, *parts]):
            raise FilterExpressionError("filter expression not allowed: names starting with '_'")
        return ast.copy_location(ast.Name(id=".".join([value.id, *reversed(parts)]), ctx=ast.Load()), node)


def _check_identity(node: ast.Compare) -> None:
    """Refuse ``is`` / ``is not`` but with None, True or False: ``filter is 'r'`` is False for every alert."""
    sides = [node.left, *node.comparators]
    for i, op in enumerate(node.ops):
        if isinstance(op, ast.Is | ast.IsNot) and not any(
                isinstance(side, ast.Constant) and side.value in (None, True, False) and not is_num(side.value)
                for side in sides[i:i + 2]):
            raise FilterExpressionError("filter expression not allowed: 'is' compares with None, True or False "
                                        "only; compare values with == (e.g. filter == 'r')")


def _checked_tree(expression: str, functions: set[str]) -> ast.expr:
    """The parsed expression with dotted names joined; raises on anything off the whitelist."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise FilterExpressionError(f"invalid filter expression {expression!r}: {exc.msg}") from exc
    except RecursionError as exc:  # the parser's own limit, on some deeply nested input
        raise FilterExpressionError(f"filter expression nested too deeply (at most {MAX_DEPTH} levels)") from exc
    if _depth(tree) > MAX_DEPTH:
        raise FilterExpressionError(f"filter expression nested too deeply (at most {MAX_DEPTH} levels)")
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise FilterExpressionError(f"filter expression not allowed: {type(node).__name__}")
        if isinstance(node, ast.Compare):
            _check_identity(node)
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id not in functions:
            raise FilterExpressionError(f"unknown name(s) {[node.func.id]}: the functions are {sorted(functions)}")
        if not isinstance(node.func, ast.Name) or node.keywords or len(node.args) > _ARITY.get(node.func.id, 1):
            raise FilterExpressionError(f"filter expression not allowed: calls only of {sorted(functions)}, with "
                                        "positional arguments (one band for the history functions)")
    joined = _Dotted().visit(tree)
    return joined.body


class AlertFilter:
    """A boolean expression over an alert, e.g. ``source.snr > 7 and scores.rb > 0.8 and ndet('r') >= 2``.

    Names are dotted paths of the alert schema (any version: ``source.snr``, ``object.ndet``,
    ``prv_sources.filter`` is the list of the history's bands), or short names: the fields of
    ``source`` and ``scores`` (``snr``, ``rb``), ``ndet``, ``first_mjd``, ``telescope``, ``field``,
    the top-level fields, ``latency`` (s from shutter close to the alert), ``class_label`` (the most
    probable light-curve class) and ``class_probability`` (its probability; null without a class). Functions over the
    history are in :data:`FUNCTIONS_HELP`. The expression is parsed once and checked against a
    whitelist of syntax (no attributes of values, no subscripts, no comprehensions, no lambdas, ``is``
    only with None, True or False, calls only of those functions, at most :data:`MAX_DEPTH` levels
    deep), then evaluated with simpleeval
    (string sizes bounded; powers to :data:`MAX_POWER_BITS` bits; repeated lists to :data:`MAX_ITEMS`
    items; ``%`` only of numbers).
    Names are checked here, before any alert; an alert on which the expression cannot be evaluated
    (a null ``rb`` compared with a number, a missing field) does not match.
    """

    def __init__(self, expression: str | None) -> None:
        self.expression = (expression or "").strip()
        if len(self.expression) > 1000:
            raise FilterExpressionError("filter expression longer than 1000 characters")
        self._alert: dict = {}
        functions = _history_functions(lambda: self._alert)
        self._eval = _Evaluator(operators=dict(_OPERATORS), functions=functions)
        self._resolve: dict[str, Callable[[dict], Any]] = {}
        self._tree: ast.expr = ast.Constant(True)
        if not self.expression:
            return
        self._tree = _checked_tree(self.expression, set(functions))
        self._resolve = self._resolvers(self._tree)
        self._probe(functions)

    @staticmethod
    def _resolvers(tree: ast.expr) -> dict[str, Callable[[dict], Any]]:
        """How to get the value of each name the expression uses; raises on unknown names."""
        flat, paths = _flat_names(), alert_paths()
        out: dict[str, Callable[[dict], Any]] = {}
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in called}
        for name in used - {"True", "False", "None"}:
            if name in _DERIVED:
                out[name] = _DERIVED[name]
            elif name in flat or name in paths:
                path = flat.get(name, name)
                out[name] = _path_getter(path)
            else:
                raise FilterExpressionError(
                    f"unknown name(s) {[name]}; use a dotted path of the alert schema (e.g. source.snr, scores.rb, "
                    f"object.ndet) or one of {sorted([*flat, *_DERIVED])}; functions: {list(FUNCTIONS_HELP)}")
        return out

    def _probe(self, functions: dict[str, Callable[..., Any]]) -> None:
        """Evaluate once on stand-in values: refuse what simpleeval refuses before any alert arrives."""
        self._eval.names = dict.fromkeys(self._resolve, 1.0)
        self._eval.functions = {k: (lambda *a: 1.0) for k in functions}
        try:
            self._eval.eval(self.expression, previously_parsed=self._tree)
        except InvalidExpression as exc:
            raise FilterExpressionError(f"filter expression not allowed: {exc}") from exc
        except Exception:  # noqa: S110, BLE001  (e.g. the stand-ins compared with strings: fine on alerts)
            pass
        finally:
            self._eval.functions = functions

    def __call__(self, alert: dict) -> bool:
        """Whether ``alert`` passes the filter (always, without an expression)."""
        if not self.expression:
            return True
        self._alert = alert
        self._eval.names = {name: get(alert) for name, get in self._resolve.items()}
        try:
            return bool(self._eval.eval(self.expression, previously_parsed=self._tree))
        except InvalidExpression as exc:
            raise FilterExpressionError(f"cannot evaluate {self.expression!r}: {exc}") from exc
        except (TypeError, ZeroDivisionError, ValueError, OverflowError, AttributeError, KeyError):
            return False

    def passes(self, alert: dict, on_error: Callable[[FilterExpressionError], None]) -> bool:
        """Whether ``alert`` passes; one whose values take the filter past the language's bounds does not.

        ``'r' in prv_sources.filter`` over 20,000 detections, or ``snr ** snr ** snr`` on a bright
        alert, raises :class:`FilterExpressionError` out of a call; here ``on_error`` is told and the
        alert is left out, so one alert (which anyone may write) stops no reader of a stream.
        """
        try:
            return self(alert)
        except FilterExpressionError as exc:
            on_error(exc)
            return False


# --- projection -----------------------------------------------------------------------------------


class FieldSelection:
    """The fields of an alert to show: dotted paths, e.g. ``objectId,source.ra,source.dec,scores.rb``.

    A path into an array (``prv_sources.mjd``) keeps the array with only that field of each item.
    Paths are checked against the alert schema (every version) when the selection is made.
    """

    def __init__(self, spec: str | None) -> None:
        self.paths = [p.strip() for p in (spec or "").split(",") if p.strip()]
        unknown = [p for p in self.paths if p not in alert_paths()]
        if unknown:
            tops = sorted(p for p in alert_paths() if "." not in p)
            raise ConfigError(f"unknown field(s) {unknown}; give dotted paths of the alert schema, e.g. "
                              f"source.ra, scores.rb, prv_sources.mjd; top-level fields: {tops}")
        self.tree: dict[str, Any] = {}
        for path in self.paths:
            node = self.tree
            *parents, leaf = path.split(".")
            for part in parents:
                if node.get(part, {}) is None:
                    break  # a parent is selected whole
                node = node.setdefault(part, {})
            else:
                node[leaf] = None

    def __bool__(self) -> bool:
        """Whether any field is selected."""
        return bool(self.paths)

    def apply(self, alert: dict) -> dict:
        """``alert`` with only the selected fields (all of them without a selection)."""
        return _project(alert, self.tree) if self.paths else alert

    def text(self, alert: dict) -> str:
        """The selected fields as one line of ``path=value`` (strings bare, the rest as JSON)."""
        values = ((p, lookup(alert, p)) for p in self.paths)
        return " ".join(f"{p}={v if isinstance(v, str) else to_json(v)}" for p, v in values)


def _project(value: Any, tree: dict[str, Any] | None) -> Any:
    if tree is None:
        return value
    if isinstance(value, list):
        return [_project(v, tree) for v in value]
    if not isinstance(value, dict):
        return None
    return {k: _project(value.get(k), sub) for k, sub in tree.items()}


def to_json(value: Any) -> str:
    """One JSON line of an alert (or a projection of it): bytes as latin-1 text, NaN as null."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, bytes):
            return f"<{len(x)} bytes>"
        return x

    return json.dumps(clean(value))
