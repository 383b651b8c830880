"""Backward passes: exact implicit differentiation and phantom gradients."""

from .base import Backward, backward_names, get_backward
from .implicit import Implicit
from .phantom import JFB, NPG, UPG

__all__ = ["Backward", "Implicit", "JFB", "NPG", "UPG", "backward_names", "get_backward"]
