"""The registry of step methods, by the name users pass as ``method=``."""
from .rk import ExplicitRK
from .tableau import TABLEAUS

METHODS = {name: ExplicitRK(tab) for name, tab in TABLEAUS.items()}
