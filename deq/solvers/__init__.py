"""Forward root-finders: one shared loop (:mod:`.base`), one algorithm per file."""

from .base import (NonFiniteError, Solver, SolverResult, get_solver, register, residual, solve,
                   solver_names)
from .fixed_point import FixedPoint
from .anderson import Anderson
from .broyden import Broyden

__all__ = ["Anderson", "Broyden", "FixedPoint", "NonFiniteError", "Solver", "SolverResult", "get_solver",
           "register", "residual", "solve", "solver_names"]
