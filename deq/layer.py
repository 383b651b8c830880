"""DEQLayer: the nn.Module that returns the fixed point of a user's function."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .grad.base import Backward, ConvergenceError, as_tuple, get_backward
from .reg import jacobian_reg
from .solvers.base import (SolverResult, State, Solver, _check_budget, _check_interval, _compact_threshold, _flatten, _spec_of,
                           get_solver, residual, solve)

__all__ = ["ConvergenceError", "Counts", "DEQLayer", "SolveCounts"]

POLICIES = ("ignore", "warn", "raise")


@dataclass
class SolveCounts:
    """How one stage's solves of a layer went, since it was built or ``reset_counts()``.

    Attributes:
        calls: solves run (for the backward: Implicit adjoint solves; phantom
            gradients run none).
        failed: solves in which at least one sample did not reach its tolerance.
        diverged: backward solves in which at least one sample diverged and was
            handled by ``Implicit.on_divergence`` (always 0 for the forward).
    """

    calls: int = 0
    failed: int = 0
    diverged: int = 0


@dataclass
class Counts:
    """``layer.counts``: the forward and the backward :class:`SolveCounts`."""

    forward: SolveCounts = field(default_factory=SolveCounts)
    backward: SolveCounts = field(default_factory=SolveCounts)


# Frames inside these directories are skipped when a warning names its line:
# the user's call of the layer (or of backward()) is what it points at.
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def _user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the caller: its first frame outside deq and torch.

    The outermost frame when every frame is inside (a backward run on an
    autograd device thread has no user frame).
    """
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _under_functorch_transform() -> bool:
    level = getattr(torch._C._functorch, "maybe_current_level", None)  # private, hence guarded
    return level is not None and level() is not None


class _RngReplay:
    """Restores the RNG state captured at the start of a layer call before each f-call.

    So every evaluation of ``f`` in one call (solver iterations, the re-attached
    call, UPG's unrolled steps) draws the same random numbers: a plain
    ``nn.Dropout`` inside ``f`` keeps one mask for the whole call.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.dev_state = torch.cuda.get_rng_state(device) if self.cuda else None

    def __call__(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.dev_state, self.device)


def _rng_states(device: torch.device) -> tuple[Tensor, ...]:
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu,)


def select_rows(x: Any, rows: Tensor) -> Any:
    """The rows ``rows`` of a layer input ``x``, for the active set (``DEQLayer(compact=...)``).

    A tensor is indexed along dim 0; tuples (named ones too), lists and dicts
    element by element; an object with a ``select_rows(rows)`` method (e.g.
    :class:`deq.models.transformer.TransformerInput`, which holds a
    positional embedding shared by the batch) answers for itself; ``None``,
    numbers and strings are passed through.

    Raises:
        TypeError: anything else.
    """
    if isinstance(x, Tensor):
        return x.index_select(0, rows)
    if hasattr(x, "select_rows"):
        return x.select_rows(rows)
    if isinstance(x, tuple):
        parts = [select_rows(v, rows) for v in x]
        return type(x)(*parts) if hasattr(x, "_fields") else tuple(parts)
    if isinstance(x, list):
        return [select_rows(v, rows) for v in x]
    if isinstance(x, dict):
        return {k: select_rows(v, rows) for k, v in x.items()}
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    raise TypeError(f"compact=True slices x by rows, but x holds a {type(x).__name__}; give it a "
                    "select_rows(rows) method")


def _check_batch_first(x: Any, batch: int, where: str = "x") -> None:
    """Every tensor select_rows would index must have the batch dimension first."""
    if isinstance(x, Tensor):
        if x.dim() == 0 or x.shape[0] != batch:
            raise ValueError(f"compact=True slices {where} along dim 0, but it has shape {tuple(x.shape)} for a "
                             f"batch of {batch}; every tensor in x must be batch-first (or give x a "
                             "select_rows(rows) method)")
    elif hasattr(x, "select_rows"):
        return
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            _check_batch_first(v, batch, f"{where}[{i}]")
    elif isinstance(x, dict):
        for k, v in x.items():
            _check_batch_first(v, batch, f"{where}[{k!r}]")


class _Call:
    """``f`` bound to ``x`` (and the RNG replay), in the forms ``solve`` and the backward passes take."""

    def __init__(self, f: Callable, x: Any, replay: _RngReplay | None):
        self.f, self.x, self.replay = f, x, replay
        self._rows: tuple[Tensor, Any] | None = None
        self._checked_rng = False

    def __call__(self, z: State, x: Any = None) -> State:
        if self.replay is not None:
            self.replay()
        return self.f(z, self.x if x is None else x)

    def on_rows(self, z: State, rows: Tensor | None) -> State:
        """``f(z, x[rows])``: the active-set form of :func:`deq.solve` (``rows`` None: every row)."""
        if rows is None:
            if self._checked_rng:
                return self(z)
            # The first call (the whole batch): f must not draw random numbers, for
            # a replayed draw on fewer rows would give its rows other masks.
            before = _rng_states(as_tuple(z)[0].device)
            out = self(z)
            self._checked_rng = True
            after = _rng_states(as_tuple(z)[0].device)
            if not all(torch.equal(a, b) for a, b in zip(before, after)):
                raise ValueError("DEQLayer(compact=True) needs an f that draws no random numbers: the rows it "
                                 "evaluates shrink, so a replayed draw (e.g. nn.Dropout) would give them other "
                                 "masks. Draw the masks once per call outside f and pass them in x (sliced with "
                                 "the rows), or use compact=False")
            return out
        if self._rows is None or self._rows[0] is not rows:
            self._rows = (rows, select_rows(self.x, rows))  # once per working set, not per call
        return self(z, self._rows[1])


class DEQLayer(nn.Module):
    """A deep equilibrium layer: ``z* = f(z*, x)``, differentiated without unrolling.

    The forward finds ``z*`` with ``solver`` under ``torch.no_grad`` (no graph of
    the iterations is kept), then hands the detached ``z*`` to ``backward``, which
    re-attaches it to autograd with the gradient it promises: exact implicit
    differentiation (:class:`deq.grad.Implicit`) or a phantom gradient
    (:class:`deq.grad.UPG`, :class:`deq.grad.NPG`, ``JFB``). Memory does not grow
    with the number of solver iterations.

    Contract for ``f``:
        * called as ``f(z, x)``; ``z`` has the structure of ``z0`` (a tensor or a
          tuple of tensors, batch first), ``x`` is passed through untouched;
          ``f`` returns the structure, shapes and dtypes of ``z``.
        * ``f`` must be a deterministic function of ``(z, x)`` within one layer
          call. Random ops (dropout) are made so by default: with
          ``fix_rng=True`` the RNG state is captured at the start of each call
          and restored before every f-call, so all solver iterations, the
          re-attached call and the backward pass see the same masks; the next
          call draws new ones. This holds in eval mode too: an ``f`` that keeps
          dropout on at eval (MC dropout, ``F.dropout(z, p, training=True)``)
          draws one mask per layer call, not one per iteration (with which no
          solve converges); a plain ``nn.Dropout`` draws nothing in eval.
          Models that draw masks explicitly per segment
          (``deq.models.dropout``) may turn it off.
        * per-sample stopping assumes samples do not interact inside ``f``
          (no batch statistics); otherwise set ``tol`` so all stop together.
        * ``f`` may be ``torch.compile``-d (pass the compiled module or
          function as ``f``). Tested on CPU with ``backend="eager"`` and
          ``"aot_eager"``: the same fixed point and the same gradients as the
          uncompiled ``f`` for Implicit, NPG and UPG, and ``nn.Dropout``
          inside it keeps one mask per layer call (its masks are drawn from
          the global generator, which the replay restores). It is called under
          ``no_grad`` (solver) and with grad (re-attached call), so expect one
          compilation per grad mode, plus recompiles when shapes change. With
          inductor the masks are also fixed within a call (its seeds come from
          the global generator) but are not the masks eager ``f`` would draw
          for the same seed (checked by hand, not in the test suite). Only the
          default CPU generator and the current CUDA device's generator are
          replayed, not a ``torch.Generator`` that ``f`` holds itself.
        * Implicit and NPG give first derivatives only: differentiating their
          gradient again (``create_graph=True``) raises rather than silently
          treating the adjoint solve as a constant; UPG/JFB and unrolled mode
          are plain autograd.
        * Backward hooks inside ``f`` (module or tensor hooks) fire on every
          VJP of the backward: ``last_result.backward.n_iter + 1`` times for
          Implicit (each adjoint-solve iteration is one VJP, then one pushes
          the adjoint to ``theta`` and ``x``), ``k`` times for NPG and UPG.
          Those VJPs are the ``J_f(z*)^T`` the adjoint solve iterates with, so a
          hook that changes ``grad_input`` (clipping, rescaling) changes the
          linear system solved, not only the gradient that comes out.
        * Implicit and NPG return views of the re-attached ``f(z*)`` (one
          graph of ``f``, no copy): they cannot be modified in place (PyTorch
          raises "... is a view and is being modified inplace"); use an
          out-of-place op or ``.clone()`` first. UPG/JFB and unrolled outputs
          are plain autograd tensors and can be.
        * When nothing but ``z*`` needs a gradient (``f``'s parameters frozen,
          an ``x`` that needs none), Implicit and NPG return a tensor that does
          not require grad, and no backward solve ever runs for it.
        * ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``,
          ``jacfwd``, ...) are not supported and raise ``RuntimeError``: the
          solver decides when to stop on the host (``.item()``) and the
          backward is an ``autograd.Function`` without functorch rules.
          ``torch.func.functional_call`` (not a transform) works. A batch is
          already solved sample by sample (each stops at its own tolerance),
          so a loop or a batch replaces ``vmap``.

    Args:
        f: the equilibrium function, an ``nn.Module`` (registered as ``self.f``,
            its parameters are the layer's) or any callable.
        solver: forward solver object or name (``deq.solver_names()``).
        backward: backward object or name (``deq.grad.backward_names()``).
        tol: forward tolerance in training mode.
        max_iter: forward iteration budget in training mode.
        eval_tol: tolerance in eval mode (default ``tol``).
        eval_max_iter: budget in eval mode (default ``max_iter``).
        stop_mode: ``"rel"`` or ``"abs"`` (see :mod:`deq.solvers.base`).
        atol: ``rel`` mode only: the absolute term of the stop test
            ``||f(z) - z|| <= atol + tol ||f(z)||`` (default 0, the plain
            relative test), in training and evaluation.
        compact: the forward solve's active-set mode (see :func:`deq.solve`):
            ``f`` runs only on the samples still iterating, with ``x`` sliced
            alongside by :func:`select_rows`. For a batch-separable ``f`` that
            draws no random numbers (masks travel in ``x``; a random draw
            inside ``f`` is detected and refused). The backward solve always
            runs on the whole batch.
        check_every: host syncs of the forward solve every this many
            iterations, or ``"auto"`` (see :func:`deq.solve`).
        time_dim: causal mode: the time axis of the state, for an ``f`` whose
            output at position ``t`` depends on positions ``<= t`` only (a
            language model). The forward solve then keeps that property
            exactly, at any iteration count and tolerance (see
            :func:`deq.solve`): an output never depends on later tokens.
            ``None``: the plain per-sample solve.
        on_nonconvergence: for a solve that did not reach its tolerance (the
            forward, and Implicit's backward solve): ``"warn"`` (default), a
            ``RuntimeWarning`` with the samples, the residual and the counts so
            far, at the 1st, 2nd, 4th, 8th, ... failed solve of each stage
            (the forward and the backward counted apart, and a backward's
            diverged solves on their own schedule), pointing at the user's
            line (the layer call, or ``backward()``); ``"ignore"``; or
            ``"raise"`` (:class:`ConvergenceError`). Whatever the policy, the
            solves are counted in :attr:`counts` (one host sync per solve).
            A diverged backward solve is handled by ``Implicit.on_divergence``.
        unroll_steps: ``None`` for DEQ mode; an integer ``L`` runs ``f`` exactly
            ``L`` times from ``z0`` with ordinary autograd (the explicit
            weight-tied network: pretraining and the baseline). A validated
            attribute: set it to ``None`` to switch to DEQ mode.
        fix_rng: replay the RNG state for every f-call of one layer call, in
            training and eval mode.

    Attributes:
        last_result: the :class:`SolverResult` of the last call (detached), a
            new object per call; ``None`` before the first. Its ``.backward``
            is filled in place when ``backward()`` runs through that call's
            output with Implicit (a reference taken after the forward sees it
            too); it stays ``None`` for UPG, NPG and JFB (no solve; their cost
            is fixed, ``k`` VJPs), in unrolled mode, and when nothing needed a
            gradient. ``repr`` prints a one-line summary.
        counts: :class:`Counts`, the forward and backward :class:`SolveCounts`
            (solves run, failed, diverged) since construction or
            :meth:`reset_counts`.

    Raises:
        ValueError: unknown names, invalid budgets or policy.

    Example:
        >>> layer = DEQLayer(MyCell(), solver=Anderson(m=5), backward=Implicit(tol=1e-6),
        ...                  tol=1e-4, max_iter=30, eval_max_iter=60)
        >>> z = layer(x)                       # z0 defaults to zeros_like(x)
        >>> layer.last_result.nstep            # forward statistics; .backward after backward()
        >>> layer.counts.backward.failed       # backward solves that missed their tolerance so far

    References:
        Bai, Kolter, Koltun, Deep Equilibrium Models, NeurIPS 2019.
    """

    def __init__(self, f: Callable[[State, Any], State], *, solver: Solver | str = "anderson",
                 backward: Backward | str = "implicit", tol: float = 1e-4, max_iter: int = 30,
                 eval_tol: float | None = None, eval_max_iter: int | None = None, stop_mode: str = "rel",
                 atol: float = 0.0, compact: bool | float = False, check_every: int | str = 1,
                 time_dim: int | None = None,
                 on_nonconvergence: str = "warn", unroll_steps: int | None = None, fix_rng: bool = True):
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        self.f = f  # nn.Module assignment registers it
        self.solver = get_solver(solver)
        self.backward = get_backward(backward)
        self.eval_tol = tol if eval_tol is None else eval_tol
        self.eval_max_iter = max_iter if eval_max_iter is None else eval_max_iter
        _check_budget(tol, max_iter, stop_mode, atol)
        _check_budget(self.eval_tol, self.eval_max_iter, stop_mode)  # atol: checked once, above
        if on_nonconvergence not in POLICIES:
            raise ValueError(f"unknown on_nonconvergence {on_nonconvergence!r}; known: {', '.join(POLICIES)}")
        self.tol, self.max_iter, self.stop_mode, self.atol = tol, max_iter, stop_mode, float(atol)
        _compact_threshold(compact)
        _check_interval(check_every, torch.device("cpu"))
        self.compact, self.check_every = compact, check_every
        self.time_dim = time_dim
        self.on_nonconvergence = on_nonconvergence
        self.unroll_steps = unroll_steps
        self.fix_rng = fix_rng
        self.last_result: SolverResult | None = None
        self.counts = Counts()

    def reset_counts(self) -> None:
        """Start :attr:`counts` (and the warning schedule that follows it) from zero."""
        self.counts = Counts()

    @property
    def time_dim(self) -> int | None:
        """``None``, or the time axis of the state for causal mode (see the constructor)."""
        return self._time_dim

    @time_dim.setter
    def time_dim(self, dim: int | None) -> None:
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
            raise ValueError(f"time_dim must be None or an integer (the time axis of the state), got {dim!r}")
        self._time_dim = dim

    @property
    def unroll_steps(self) -> int | None:
        """``None`` (DEQ mode) or the depth ``L`` of the explicit weight-tied twin."""
        return self._unroll_steps

    @unroll_steps.setter
    def unroll_steps(self, steps: int | None) -> None:
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"unroll_steps must be None or an integer >= 1, got {steps!r}")
        self._unroll_steps = steps

    def extra_repr(self) -> str:
        return (f"solver={self.solver}, backward={self.backward}, tol={self.tol}, max_iter={self.max_iter}, "
                f"eval_tol={self.eval_tol}, eval_max_iter={self.eval_max_iter}, stop_mode={self.stop_mode!r}, "
                f"atol={self.atol}, "
                f"unroll_steps={self.unroll_steps}")

    def forward(self, x: Any, z0: State | None = None, *, max_iter: int | None = None,
                jac_reg: int = 0) -> State | tuple[State, Tensor]:
        """Return the equilibrium ``z*`` for input ``x``, structured like ``z0``.

        Args:
            x: the input injected into ``f`` (anything ``f`` accepts).
            z0: initial guess; defaults to ``zeros_like(x)`` when ``x`` is a tensor.
            max_iter: this call's iteration budget instead of the mode's
                (``max_iter`` in training, ``eval_max_iter`` in eval); the DEQ
                recipes draw it per step (``f_thres + randint(-2, 0)``).
                Ignored in unrolled mode.
            jac_reg: number of Hutchinson probes of the Jacobian regulariser;
                with ``jac_reg > 0`` the call also returns
                :func:`deq.reg.jacobian_reg` of ``f`` at the point it returns
                from: ``z*`` in DEQ mode (not ``f(z*)``), the last input of
                ``f`` in unrolled mode, with the same dropout masks as the
                solve (the RNG replay of ``fix_rng`` covers it). It costs one
                more call of ``f`` and one double-backward VJP per probe.

        Returns:
            ``z`` with the structure of ``z0``: ``f(z*, x)`` re-attached for
            Implicit/NPG/JFB, ``k`` damped steps from ``z*`` for UPG, ``f``
            applied ``unroll_steps`` times in unrolled mode. With
            ``jac_reg > 0`` the pair ``(z, jac_loss)``, ``jac_loss`` a scalar
            with a graph to the parameters of ``f`` and to ``x``.

        Raises:
            ValueError: ``z0`` missing for a non-tensor ``x``, ``f`` returned
                another shape/dtype, invalid ``max_iter`` or ``jac_reg``; see
                :func:`deq.solve`.
            NonFiniteError: ``f`` produced NaN/inf (forward or backward).
            ConvergenceError: not converged and ``on_nonconvergence="raise"``.
            RuntimeError: called under a ``torch.func`` transform.
        """
        if not isinstance(jac_reg, int) or isinstance(jac_reg, bool) or jac_reg < 0:
            raise ValueError(f"jac_reg must be an integer >= 0 (Hutchinson probes), got {jac_reg!r}")
        if _under_functorch_transform():
            raise RuntimeError("DEQLayer does not support torch.func transforms (vmap, grad, jacrev, jacfwd, ...): "
                               "the solver stops on a host-side test (.item()) and the backward is an "
                               "autograd.Function without functorch rules. Call it on the batch (each sample stops "
                               "at its own tolerance) and differentiate with torch.autograd")
        if z0 is None:
            if not isinstance(x, Tensor):
                raise ValueError("z0 is required when x is not a tensor (the default is zeros_like(x))")
            z0 = torch.zeros_like(x)
        device = as_tuple(z0)[0].device
        replay = _RngReplay(device) if self.fix_rng else None
        call = _Call(self.f, x, replay)
        tol, budget = (self.tol, self.max_iter) if self.training else (self.eval_tol, self.eval_max_iter)
        if self.compact and self.unroll_steps is None:
            _check_batch_first(x, as_tuple(z0)[0].shape[0])
        if max_iter is not None:
            _check_budget(tol, max_iter, self.stop_mode)
            budget = max_iter
        if self.unroll_steps is not None:
            z = self._unrolled(call, z0, tol)
        else:
            res = solve(call.on_rows if self.compact else call, z0, solver=self.solver, tol=tol, max_iter=budget,
                        stop_mode=self.stop_mode, atol=self.atol, compact=self.compact,
                        check_every=self.check_every, time_dim=self.time_dim)
            res = res.detach()
            self.last_result = res
            self._apply_policy(res, "forward")
            if torch.is_grad_enabled():
                z = self.backward.attach(call, res.z, x, report=self._reporter(res))
            else:
                z = call(res.z)
        if not jac_reg:
            return z
        return z, jacobian_reg(call, self.last_result.z, x, n_probes=jac_reg)

    def _unrolled(self, call: _Call, z0: State, tol: float) -> State:
        """``f`` applied ``unroll_steps`` times with autograd; records the residual trace."""
        steps = self.unroll_steps
        spec = _spec_of(z0)
        z, trace, prev = z0, [], _flatten(z0, spec).detach()
        for _ in range(steps):
            last_in = z
            z = call(z)
            cur = _flatten(z, spec).detach()
            trace.append(residual(prev, cur, self.stop_mode))
            prev = cur
        trace = torch.stack(trace)
        batch = trace.shape[1]
        final = trace[-1]
        # As in DEQ mode (z* recorded, f(z*) returned): the recorded z is the last
        # input of f, whose residual ||f(z) - z|| is the one reported.
        detached = tuple(t.detach() for t in last_in) if isinstance(last_in, tuple) else last_in.detach()
        self.last_result = SolverResult(
            z=detached, nstep=torch.full((batch,), steps, dtype=torch.int64, device=final.device),
            residual=final, converged=final <= tol, trace=trace,
            best_step=torch.full((batch,), steps - 1, dtype=torch.int64, device=final.device),
            n_iter=steps, solver="unrolled", stop_mode=self.stop_mode, tol=tol, atol=self.atol)
        return z

    def _reporter(self, fwd: SolverResult) -> Callable[[SolverResult, Tensor | None], None]:
        def report(bwd: SolverResult, diverged: Tensor | None = None) -> None:
            # In place, so that a reference to this call's result taken after
            # the forward sees its backward too; a frozen dataclass otherwise,
            # and no other field ever changes.
            object.__setattr__(fwd, "backward", bwd.detach())
            self._apply_policy(fwd.backward, "backward", diverged)

        return report

    def _apply_policy(self, res: SolverResult, stage: str, diverged: Tensor | None = None) -> None:
        """Count the solve, then warn (on the schedule) or raise as ``on_nonconvergence`` says."""
        counts = getattr(self.counts, stage)
        counts.calls += 1
        failed = ~res.converged
        if failed.numel() == 0:
            return
        stats = [failed.sum(), res.residual.max(), failed.new_zeros(()) if diverged is None else diverged.sum()]
        n_bad, worst, n_div = torch.stack([t.to(res.residual.dtype) for t in stats]).tolist()  # one host sync
        if n_bad == 0:
            return
        counts.failed += 1
        counts.diverged += int(n_div > 0)
        msg = (f"DEQLayer {stage} solve ({res.solver}) did not converge for {int(n_bad)} of "
               f"{res.residual.numel()} samples in {res.n_iter} iterations: max residual {worst:.3g} > tol "
               f"{res.tol:g} ({res.stop_mode})")
        if n_div:
            msg += (f"; {int(n_div)} of them diverged (adjoint residual not below ||dL/dz*||) and were handled by "
                    f"on_divergence={getattr(self.backward, 'on_divergence', None)!r}")
        if self.on_nonconvergence == "raise":
            raise ConvergenceError(msg)
        due = _is_power_of_two(counts.failed) or (n_div > 0 and _is_power_of_two(counts.diverged))
        if self.on_nonconvergence == "warn" and due:
            so_far = f"{counts.failed} of {counts.calls} {stage} solves failed"
            if stage == "backward":
                so_far += f", {counts.diverged} diverged"
            msg += f". So far {so_far} (layer.counts.{stage}); warned at the 1st, 2nd, 4th, 8th, ... failure"
            warnings.warn(msg, RuntimeWarning, stacklevel=_user_stacklevel())
