"""The registry of step methods, by the name users pass as ``method=``.

Entries are immutable method descriptions shared by every solve; a solve gets its own stepper
from ``METHODS[name].start(problem)``.
"""
from .adams import ADAMS_METHODS
from .auto import AutoSwitch
from .implicit import IMPLICIT_METHODS
from .implicit_fixed import FIXED_IMPLICIT_METHODS
from .rk import ExplicitRK
from .scipy_wrapper import SCIPY_METHODS
from .tableau import TABLEAUS

METHODS = {name: ExplicitRK(tab) for name, tab in TABLEAUS.items()}
METHODS.update(ADAMS_METHODS)
METHODS.update(FIXED_IMPLICIT_METHODS)
METHODS.update(SCIPY_METHODS)
METHODS.update(IMPLICIT_METHODS)
METHODS["auto"] = AutoSwitch(METHODS["dopri5"], METHODS["kvaerno5"])


def get_method(name):
    """The method called ``name`` (``None`` means dopri5, torchdiffeq's default)."""
    name = "dopri5" if name is None else name
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]
