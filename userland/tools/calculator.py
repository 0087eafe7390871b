"""Calculator: arithmetic on numbers, evaluated from its syntax tree (never `eval`)."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from userland.tools.runtime import ToolError

MANIFEST = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression, e.g. '2 * (3 + 4) ** 2' or 'sqrt(2)'.",
    "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "minLength": 1, "maxLength": 1000}},
        "required": ["expression"], "additionalProperties": False},
    "result": {"type": "object", "properties": {"value": {"type": "number"}}},
    "side_effect": "read-only",
    "concurrency": 8,
    "timeout_s": 5.0,
}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {name: getattr(math, name) for name in (
    "sqrt", "exp", "log", "log2", "log10", "sin", "cos", "tan", "asin", "acos", "atan",
    "floor", "ceil", "factorial", "gcd", "hypot", "degrees", "radians")}
_FUNCTIONS.update(abs=abs, round=round, min=min, max=max)
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
MAX_INT_BITS = 4096  # results past this are refused: 9**9**9 would take the process's memory


def _check(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"result too large (over {MAX_INT_BITS} bits)")
    return value


def _too_big_power(base: Any, exponent: Any) -> bool:
    if not isinstance(exponent, int | float) or not isinstance(base, int | float):
        return False
    if abs(exponent) > MAX_INT_BITS:
        return True
    return abs(base) > 1 and abs(exponent) * math.log2(abs(base)) > MAX_INT_BITS


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and _too_big_power(left, right):
            raise ToolError("exponent too large")
        if (isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_INT_BITS):
            raise ToolError(f"result too large (over {MAX_INT_BITS} bits)")
        return _check(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS and not node.keywords):
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial" and args and isinstance(args[0], int) and args[0] > 500:
            raise ToolError("factorial argument too large (at most 500)")
        return _check(_FUNCTIONS[node.func.id](*args))
    raise ToolError(f"not allowed in an expression: {ast.dump(node)[:60]}")


def evaluate(expression: str) -> int | float:
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"syntax error: {exc.msg}") from None
    try:
        return _eval(tree)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from None


def run(args: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    return {"value": evaluate(args["expression"])}
