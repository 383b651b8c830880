"""The solver contract: what a root-finder implements and what a solve returns.

A root-finder is a :class:`Solver` with two methods, ``init`` and ``step``, on
a flat ``(B, D)`` view of the state (:class:`Iterate`); the shared loop of
:func:`deq.solve` (:mod:`deq.solvers.base`) does everything else and returns a
:class:`SolverResult`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Union

import torch
from torch import Tensor

from .._registry import Registry

State = Union[Tensor, tuple[Tensor, ...]]

STOP_MODES = ("abs", "rel")


class NonFiniteError(FloatingPointError):
    """``f`` (or the backward solve) produced NaN or inf.

    Attributes:
        stage: "forward", "backward" or another name given by the caller.
        step: the iteration at which it happened (0 is the call ``f(z0)``).
        samples: batch indices of the samples whose values are not finite.
        result: the :class:`SolverResult` of the best finite iterates found before
            the failure, or ``None`` when it happened in ``f(z0)``.
    """

    def __init__(self, message: str, *, stage: str, step: int, samples: list[int],
                 result: "SolverResult | None" = None):
        super().__init__(message)
        self.stage = stage
        self.step = step
        self.samples = samples
        self.result = result


@dataclass(frozen=True)
class SolverResult:
    """What one call of :func:`solve` found, batch first.

    Attributes:
        z: the best iterate of each sample (see the module docstring), with the
            structure, shapes, dtypes and memory formats of ``z0``.
        nstep: ``(B,)`` int64, calls of ``f`` charged to each sample (line-search
            calls included; calls made after a sample converged are not charged).
        residual: ``(B,)`` residual of the returned ``z`` in ``stop_mode``.
        converged: ``(B,)`` bool, the stop test at the returned ``z``.
        trace: ``(n_iter, B)`` residual of the current iterate at each iteration
            (a converged sample repeats its last value).
        best_step: ``(B,)`` int64, the iteration at which the returned ``z`` was
            found (0 is ``z0`` itself).
        n_iter: iterations the loop ran (the largest ``best_step`` is below it).
        solver: the solver's name, e.g. ``"anderson"``.
        stop_mode: ``"abs"`` or ``"rel"``.
        tol: the tolerance the solve was run at.
        atol: the absolute tolerance added in ``rel`` mode (0 in ``abs`` mode,
            where ``tol`` is the absolute tolerance).
        rows: the rows ``f`` processed over the solve (each call adds its
            batch size): the honest cost of the batch, where ``nstep`` is that
            of each sample. Without ``compact`` it is ``n_iter * B``; ``None``
            where not counted (the unrolled layer).
        backward: for a :class:`deq.DEQLayer` call, the result of the backward
            (adjoint) solve once ``backward()`` has run; ``None`` otherwise.
    """

    z: State
    nstep: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor
    best_step: Tensor
    n_iter: int
    solver: str
    stop_mode: str
    tol: float
    backward: "SolverResult | None" = None
    atol: float = 0.0
    rows: int | None = None

    def detach(self) -> "SolverResult":
        """This result with every tensor detached from autograd."""
        z = tuple(t.detach() for t in self.z) if isinstance(self.z, tuple) else self.z.detach()
        return dataclasses.replace(self, z=z)

    def summary(self) -> dict[str, float]:
        """Batch statistics as plain floats, for logs (one host sync)."""
        nstep = self.nstep.double()
        res = self.residual.double()
        if nstep.numel() == 0:
            return dict.fromkeys(("nstep_mean", "nstep_max", "residual_mean", "residual_max", "converged_frac"),
                                 math.nan)
        stats = torch.stack([nstep.mean(), nstep.max(), res.mean(), res.max(),
                             self.converged.double().mean()]).tolist()
        keys = ("nstep_mean", "nstep_max", "residual_mean", "residual_max", "converged_frac")
        return dict(zip(keys, stats))

    def __repr__(self) -> str:
        """One line (not the tensors): iterations, nstep, worst residual, converged, and the backward's."""
        batch = self.residual.numel()
        head = f"{self.solver}, batch {batch}, n_iter {self.n_iter}"
        if batch:
            s = self.summary()
            tol = f"tol {self.tol:g}" + (f", atol {self.atol:g}" if self.atol else "")
            head += (f", nstep mean {s['nstep_mean']:.3g} max {int(s['nstep_max'])}, max residual "
                     f"{s['residual_max']:.3g} ({tol}, {self.stop_mode}), converged "
                     f"{round(s['converged_frac'] * batch)}/{batch}")
        if self.rows is not None:
            head += f", rows {self.rows}"
        tail = "" if self.backward is None else f", backward={self.backward!r}"
        return f"SolverResult({head}{tail})"


class Iterate(NamedTuple):
    """The current iterate as the loop hands it to :meth:`Solver.step`, flat ``(B, D)``.

    Attributes:
        z: the iterate.
        fz: ``f(z)``.
        g: ``f(z) - z``, computed once per iteration and shared by the loop
            (the stop test) and the solver.
        gn: ``(B,)`` ``||g||`` per sample, of the iterate as ``f`` saw it.
    """

    z: Tensor
    fz: Tensor
    g: Tensor
    gn: Tensor


Evaluate = Callable[[Tensor, Tensor], Tensor]


class Solver:
    """Base class of the root-finders: ``init`` and ``step`` on flat states.

    Subclasses are frozen dataclasses holding the algorithm's options; they keep
    no per-solve data on ``self`` (one object may serve many solves).

    The loop calls ``state = init(it)`` once with the :class:`Iterate` of
    ``z0``, then ``state, z, fz, g = step(state, it, active, evaluate)`` per
    iteration. Tensors are ``(B, D)`` in the working dtype (float32 or wider).
    ``step`` must return ``z`` unchanged for samples where ``active`` is False,
    must obtain ``fz = f(z)`` only through ``evaluate(z, charge)``, which calls
    ``f`` and charges one call to each sample where ``charge`` is True, and
    returns ``g = fz - z`` of the new iterate (computed where it suits the
    solver, e.g. into its own buffer). It may keep references to the tensors
    of ``it`` (the loop never modifies them) and must not modify them in
    place; it returns a new ``z``. Its own buffers it may update in place.
    """

    name: ClassVar[str] = ""

    def init(self, it: Iterate) -> Any:
        raise NotImplementedError  # abstract

    def step(self, state: Any, it: Iterate, active: Tensor,
             evaluate: Evaluate) -> tuple[Any, Tensor, Tensor, Tensor]:
        raise NotImplementedError  # abstract

    def causal(self, length: int) -> "Solver":
        """This solver for causal mode, or ``TypeError`` if it has none.

        In causal mode (``solve(..., time_dim=...)``) the flat state has one
        row per (sample, position), each sample's ``length`` rows consecutive
        and in time order, and ``it.gn`` holds each row's prefix norm
        ``||g_{<= t}||``. Row ``t`` of the new iterate may depend on rows
        ``<= t`` of its own sample only. A solver whose algebra is row by row
        returns itself.
        """
        raise TypeError(f"solver {self.name or type(self).__name__!r} has no causal mode (time_dim=...)")


_SOLVERS: Registry[Solver] = Registry("solver", Solver, plural="solvers")
register = _SOLVERS.register


def solver_names() -> list[str]:
    """The names accepted by ``solver=`` (sorted)."""
    return _SOLVERS.names()


def get_solver(solver: "Solver | str") -> Solver:
    """A solver object from an object or a registered name (``ValueError`` lists the names)."""
    return _SOLVERS.get(solver)
