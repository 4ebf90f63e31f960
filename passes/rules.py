"""The names the op table had when it was this one module of comb/rewrite
rules: RULES is the op table (passes/ops), Rule its record, rule its
decorator. arg and set_arg now take the argument's schema name, no index:
arg(node, "dim", default), set_arg(node, "groups", value)."""
from .ops import OPS as RULES, SPATIAL, Op as Rule, arg, op as rule, resolve_op, set_arg  # noqa: F401
