"""Backward passes: exact implicit differentiation and phantom gradients."""

from .base import Backward, ConvergenceError, backward_names, compute_dtype, get_backward
from .implicit import Implicit, default_tol
from .phantom import JFB, NPG, UPG

__all__ = ["Backward", "ConvergenceError", "Implicit", "JFB", "NPG", "UPG", "backward_names", "compute_dtype",
           "default_tol", "get_backward"]
