"""The shared solver loop: flattening, the stop test, per-sample stopping, best iterate, counting.

Every root-finder in :mod:`deq.solvers` implements two methods, ``init`` and
``step``, on a flat ``(B, D)`` view of the state. Everything else lives here,
once: calling ``f`` and checking what it returns, counting f-calls per sample,
the stop test, freezing converged samples, keeping the best iterate, the
residual trace and the non-finite check.

**Stop test** (one definition for the whole library), per sample ``b``, with
``g = f(z) - z``::

    converged_b  <=>  ||g_b||_2 <= atol + rtol * ||f(z)_b||_2

the form of NumPy's ``allclose`` and Optimistix, valid at ``z* = 0`` once
``atol > 0``. The two stop modes are its special cases: ``stop_mode="abs"`` is
``atol = tol, rtol = 0``; ``stop_mode="rel"`` is ``rtol = tol`` with the
``atol`` argument (default 0, the plain relative test, which never calls a
point with ``f(z) = 0 != z`` converged but which an iterate tending to
``z* = 0`` may never pass: give ``atol`` there).

**Residual reported** (``SolverResult.residual`` and ``.trace``) in the stop
mode's units::

    abs:  r_b = ||g_b||
    rel:  r_b = ||g_b|| / ||f(z)_b||      (0 where g_b = 0; +inf where f(z)_b = 0 != g_b)

No epsilon is added to the denominator. With ``atol > 0`` a sample may be
``converged`` with ``r_b > tol`` (it passed through ``atol``).

**Best iterate.** The iterate that passed the stop test when there is one
(the sample stops there); otherwise the one with the smallest ``||g||``.
Ordering by ``||g||``, not by ``r_b``, matters for a diverging solve in
``rel`` mode: there the relative residual of a growing iterate falls towards
``(a - 1) / a`` while it runs away, so "lowest relative residual" would
return the most diverged iterate.

**Norms** are taken in the working dtype. Where a norm overflows although the
vector is finite (float32 entries above about ``1.8e19``), the loop switches to
a scaled norm (``max |v| * ||v / max |v|||``) for the rest of the solve; a
vector with NaN/inf entries raises :class:`NonFiniteError` (checked with the
stop test: no extra host sync).

When ``f`` works in a narrower dtype than the solver (bf16/fp16 ``z0``), the
residual is that of the iterate as ``f`` saw it, rounded to ``z0``'s dtype: the
residual reported is the residual of the ``z`` that is returned.

**Mixed precision.** Under ``torch.autocast`` the solver's own arithmetic runs
with autocast disabled, in its float32 (or wider) working dtype, and ``f`` is
called with the caller's autocast state. There ``f`` may return a
lower-precision floating dtype than ``z0`` (what autocast produced); it is cast
to the working dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# Re-exported: the layer and the backward passes flatten states like the loop does,
# and deq.solvers.base has always been where the contract was imported from.
from ._flat import _flatten, _spec_of, _unflatten  # noqa: F401
from ._loop import _Autocast, _CausalLoop, _Loop, _StopTest, _empty_result, residual  # noqa: F401
from .contract import (STOP_MODES, Iterate, NonFiniteError, Solver, SolverResult, State,  # noqa: F401
                       get_solver, register, solver_names)


def _check_budget(tol: float, max_iter: int, stop_mode: str, atol: float = 0.0) -> None:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; known: {', '.join(STOP_MODES)}")
    if not (isinstance(atol, (int, float)) and not isinstance(atol, bool) and atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    if atol and stop_mode == "abs":
        raise ValueError(f"atol={atol!r} applies to stop_mode='rel' (converged when ||f(z) - z|| <= atol + tol "
                         "||f(z)||); with stop_mode='abs', tol itself is the absolute tolerance")


COMPACT_THRESHOLD = 0.95


def _compact_threshold(compact: bool | float) -> float | None:
    if compact is False:
        return None
    if compact is True:
        return COMPACT_THRESHOLD
    if isinstance(compact, (int, float)) and not isinstance(compact, bool) and 0 < compact <= 1:
        return float(compact)
    raise ValueError(f"compact must be True, False or a threshold in (0, 1], got {compact!r}")


def _check_interval(check_every: int | str, device: torch.device) -> int | None:
    """The loop's check interval; ``None`` for the adaptive schedule (``_Schedule``)."""
    if check_every == "auto":
        # A host sync costs next to nothing on the CPU; on an accelerator it
        # drains the launch queue, so there the schedule predicts when to check.
        return 1 if device.type == "cpu" else None
    if check_every == "adaptive":
        return None
    if isinstance(check_every, int) and not isinstance(check_every, bool) and check_every >= 1:
        return check_every
    raise ValueError(f"check_every must be an integer >= 1, 'auto' or 'adaptive', got {check_every!r}")


@torch.no_grad()
def solve(f: Callable[..., State], z0: State, *, solver: "Solver | str" = "anderson",
          tol: float = 1e-4, max_iter: int = 50, stop_mode: str = "rel", atol: float = 0.0,
          compact: bool | float = False, check_every: int | str = 1, time_dim: int | None = None,
          stage: str = "forward") -> SolverResult:
    """Find z* = f(z*) for each sample of a batch.

    Solves ``z = f(z)`` (equivalently the root of ``g(z) = f(z) - z``) with a
    registered root-finder, per sample: each sample stops when it passes the
    stop test ``||f(z) - z|| <= atol + rtol ||f(z)||`` (module docstring),
    after which it no longer changes and no more f-calls are charged to it;
    the loop ends when every sample has stopped or after ``max_iter``
    iterations. Runs under ``torch.no_grad``.

    Args:
        f: maps a state to a state of the same structure, shapes and dtypes.
            Batch dimension first: ``(B, ...)`` or a tuple of ``(B, ...)``.
            With ``compact``, called as ``f(z, rows)`` (see there).
        z0: initial guess, a tensor or a tuple of tensors, batch first. Each
            part reaches ``f`` contiguous, in its memory format (channels-last
            stays channels-last).
        solver: a :class:`Solver` object or a name from :func:`solver_names`.
        tol: the tolerance: ``rtol`` in ``rel`` mode, ``atol`` in ``abs`` mode.
        max_iter: iterations at most; each is one call of ``f`` on the batch
            (a line-search trial is an iteration too). The call ``f(z0)`` is
            the first iteration.
        stop_mode: ``"rel"`` or ``"abs"``.
        atol: ``rel`` mode only: the absolute term of the stop test (0: the
            plain relative test). Needed where ``z* = 0``, where the relative
            residual does not tend to 0.
        compact: active-set mode, for a batch-separable ``f`` (no operation
            across samples, e.g. no BatchNorm in training mode). Once the share
            of still-iterating samples in the working set falls to the
            threshold (``True``: 0.95; a float in ``(0, 1]``: that share; 1
            compacts whenever a sample stops), the stopped ones are dropped and
            ``f`` runs on the rest only. ``f`` is then called as
            ``f(z, rows)``: ``rows`` is ``None`` for the whole batch, else the
            ``(b,)`` int64 batch indices (ascending) of the ``b`` rows of
            ``z``; ``f`` must slice whatever per-sample data it closes over
            with it. Results equal those of the full batch (up to the rounding
            of batched kernels); ``SolverResult.rows`` counts the rows ``f``
            processed.
        check_every: host syncs (the stop and finiteness check) every this many
            iterations; ``"adaptive"``: the next check when the slowest
            sample's residual decay predicts it will stop (at most 8 apart);
            ``"auto"``: 1 on the CPU (a sync costs nothing there), adaptive on
            an accelerator. Per-sample results do not depend on it: a sample
            that stops between two checks is frozen and charged nothing more;
            only ``n_iter`` (and the rows of a batch that is already done) may
            grow by up to the check interval minus one.
        time_dim: causal mode, for a state with a time axis (the same dim of
            every part) and an ``f`` whose output at position ``t`` depends on
            positions ``<= t`` only: the solve keeps that property exactly, at
            every iteration count and tolerance. Stopping is by prefix
            (position ``t`` freezes once the positions ``<= t`` pass the test;
            a sample stops when all its positions have), the solver works per
            position (Anderson mixes with coefficients fitted on each
            position's prefix; Broyden keeps one low-rank inverse Jacobian
            per position; see :class:`_CausalLoop` for the returned iterate).
            ``nstep``, ``residual``, ``converged`` and ``trace`` are per sample,
            taken on the whole sequence. With ``compact``, a sample leaves the
            working set once all its positions have stopped.
        stage: a name used in error messages (``"forward"``, ``"backward"``).

    Returns:
        A :class:`SolverResult`. Non-convergence is not an error: see
        ``converged`` and ``residual``. An empty batch returns an empty
        result without calling ``f``.

    Raises:
        ValueError: ``f`` returned another structure, shape or dtype than ``z0``,
            unknown solver name or stop mode, invalid ``tol``/``max_iter``/``atol``/
            ``compact``/``check_every``.
        NonFiniteError: ``f`` returned NaN/inf for a sample still iterating (or
            the solver's iterate overflowed); ``err.result`` holds the best
            finite iterates found before.

    Example:
        >>> res = solve(torch.cos, torch.zeros(4, 1), solver="anderson", tol=1e-8)
        >>> round(res.z[0, 0].item(), 6)
        0.739085
    """
    algo = get_solver(solver)
    _check_budget(tol, max_iter, stop_mode, atol)
    spec = _spec_of(z0, time_dim)
    device = (z0[0] if spec.is_tuple else z0).device
    if time_dim is not None:
        algo = algo.causal(spec.length)
    test = _StopTest(stop_mode, tol, float(atol))
    loop_options = dict(compact=_compact_threshold(compact), check_every=_check_interval(check_every, device))
    if spec.batch == 0:
        return _empty_result(z0, spec, test, algo)
    amp = _Autocast.capture(device)
    loop = (_Loop if time_dim is None else _CausalLoop)(f, spec, test, algo, stage, device, amp, **loop_options)
    with amp.outside():
        loop.start(_flatten(z0, spec))
        while loop.keep_going and loop.n_iter < max_iter:
            loop.record(*algo.step(loop.state, loop.it, loop.active, loop.evaluate))
        if loop.schedule.last != loop.n_iter:
            loop.check(final=True)  # the last iterate's check, when the schedule skipped it
        return loop.result()
