"""deq: deep equilibrium models in PyTorch.

``solve`` finds fixed points with a pluggable root-finder; ``DEQLayer`` wraps an
equilibrium function as an ``nn.Module`` that trains through implicit or
phantom gradients in memory that does not grow with the number of iterations.
"""

from .grad import JFB, NPG, UPG, Backward, Implicit, backward_names, get_backward
from .layer import ConvergenceError, DEQLayer
from .solvers import (Anderson, Broyden, FixedPoint, NonFiniteError, Solver, SolverResult, get_solver, solve,
                      solver_names)

__version__ = "0.1.0"

__all__ = ["Anderson", "Backward", "Broyden", "ConvergenceError", "DEQLayer", "FixedPoint", "Implicit", "JFB",
           "NPG", "NonFiniteError", "Solver", "SolverResult", "UPG", "backward_names", "get_backward",
           "get_solver", "solve", "solver_names", "__version__"]
