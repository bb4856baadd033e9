"""The registry of step methods, by the name users pass as ``method=``."""
from .rk import ExplicitRK
from .tableau import TABLEAUS

METHODS = {name: ExplicitRK(tab) for name, tab in TABLEAUS.items()}

from .implicit import IMPLICIT_METHODS  # noqa: E402  (stiff: ESDIRK with Newton)

METHODS.update(IMPLICIT_METHODS)

from .auto import AutoSwitch  # noqa: E402

METHODS["auto"] = AutoSwitch(METHODS["dopri5"], METHODS["kvaerno5"])
