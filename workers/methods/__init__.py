"""PEFT method registry: one module per method, each registered under its grid name."""

from workers.methods import (  # noqa: F401  (registration)
    adalora,
    bitfit,
    full,
    lbp_wht,
    lora,
    mobiletl,
    qlora,
    snella,
)
from workers.methods.base import (
    METHODS,
    Adapted,
    MethodContext,
    apply_method,
    check_applicable,
    count_parameters,
)

__all__ = [
    "METHODS",
    "Adapted",
    "MethodContext",
    "apply_method",
    "check_applicable",
    "count_parameters",
]
