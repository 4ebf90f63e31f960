"""The names the op table had when it was one module of comb/rewrite rules:
RULES is the op table (passes/ops), Rule its record, rule its decorator."""
from .ops import OPS as RULES, SPATIAL, Op as Rule, arg, op as rule, resolve_op, set_arg  # noqa: F401
