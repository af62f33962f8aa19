"""PEFT method registry: one module per method, each registered under its grid name."""

from workers.methods import bitfit, full, lora  # noqa: F401  (registration)
from workers.methods.base import METHODS, Adapted, MethodContext, apply_method

__all__ = ["METHODS", "Adapted", "MethodContext", "apply_method"]
