"""One run of :func:`jaxlinear.check_vjp`: a device, a dtype and a variant of the
arguments, with what the rule, the reference and float64 truth gave there."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _check_programs as programs
from ._check_args import device_name
from ._check_explore import Variant
from ._tolerances import Tolerance, unit_roundoff


@dataclasses.dataclass
class Context:
    """What every run of one :func:`check_vjp` call shares."""

    spec: programs.Spec
    ref_spec: programs.Spec | None
    float_names: list[str]
    out_names: list[str]
    table: dict[np.dtype, Tolerance]
    checks: frozenset[str]
    seed: int
    num_directions: int
    elementwise_max_size: int
    vmap_in_axes: Any
    vmap_size: int
    precision: Any
    digests: dict = dataclasses.field(default_factory=dict)

    @property
    def compares_reference(self) -> bool:
        return self.ref_spec is not None and "reference" in self.checks

    def fingerprinted(self, spec: programs.Spec, kind: str, traced, *args) -> programs.Spec:
        """``spec`` with the digest of ``traced(*args)``, computed once per shapes."""
        avals = tuple(jax.tree.map(lambda a: (np.shape(a), str(a.dtype)), jax.tree.leaves(args)))
        key = (id(spec.fn), kind, avals)
        if key not in self.digests:
            self.digests[key] = spec.with_digest(programs.fingerprint(traced, *args))
        return self.digests[key]


@contextlib.contextmanager
def scoped(x64: bool, precision):
    """x64 on if asked and the default matmul precision, both undone on exit."""
    with contextlib.ExitStack() as stack:
        if x64:
            stack.enter_context(jax.enable_x64(True))
        if precision is not None:
            stack.enter_context(jax.default_matmul_precision(precision))
        yield


def _least_precise(dtypes) -> np.dtype:
    return max((np.dtype(d) for d in dtypes), key=lambda d: float(jnp.finfo(d).eps))


@dataclasses.dataclass
class Run:
    """One device, dtype and variant: its inputs, draws and the rule's results."""

    ctx: Context
    device: Any
    variant: Variant
    index: int
    float_host: list[np.ndarray]
    other_host: list[np.ndarray]
    out_shapes: list[Any] = dataclasses.field(default_factory=list)
    out_treedef: Any = None
    tol: Tolerance | None = None
    unit: float = 0.0
    eps: float = 0.0
    u_host: list[np.ndarray] = dataclasses.field(default_factory=list)
    rule_out: list[np.ndarray] = dataclasses.field(default_factory=list)
    rule_cts: list[np.ndarray] = dataclasses.field(default_factory=list)
    spec: programs.Spec | None = None
    traces_first: int = 0
    call: Any = None  # call 1's compiled program, called again by the retrace check
    ad: tuple[list[np.ndarray], list[np.ndarray]] | None = None  # the reference's, this dtype
    ad_cts: list[np.ndarray] | None = None  # autodiff of the reference, this dtype
    fd: tuple | None = None  # float64 differences and their note, when computed early

    @property
    def dev(self) -> str:
        return device_name(self.device)

    @property
    def label(self) -> str:
        return ",".join(sorted({str(h.dtype) for h in self.float_host}))

    @property
    def x64(self) -> bool:
        return any(h.dtype == np.float64 for h in self.float_host)

    def rng(self, purpose: int) -> np.random.Generator:
        """Draws fixed by the seed, the variant and their purpose, never by which
        checks run or fail."""
        return np.random.default_rng([self.ctx.seed, self.index, purpose])

    def put(self, leaves, device=None) -> list:
        return [jax.device_put(h, device or self.device) for h in leaves]

    def put_tree(self, treedef, leaves, device=None):
        return jax.tree.unflatten(treedef, self.put(leaves, device))

    def truth_device(self):
        """float64 everywhere but on TPUs, which have no native float64."""
        return self.device if self.device.platform != "tpu" else jax.devices("cpu")[0]


def new_run(ctx: Context, device, dtype, variant: Variant, index: int) -> Run:
    spec = ctx.spec
    host = list(variant.host)
    for i in spec.float_idx:
        if dtype is not None:
            host[i] = host[i].astype(dtype)
    return Run(
        ctx=ctx,
        device=device,
        variant=variant,
        index=index,
        float_host=[host[i] for i in spec.float_idx],
        other_host=[host[i] for i in spec.other_idx],
    )


def prepare(run: Run) -> None:
    """Output shapes, tolerance, unit roundoff and the cotangent u (may raise)."""
    spec = run.ctx.spec
    out = jax.eval_shape(spec.fn, *spec.assemble(run.float_host, run.other_host))
    run.out_shapes, run.out_treedef = jax.tree.flatten(out)
    dtypes = [h.dtype for h in run.float_host] + [o.dtype for o in run.out_shapes]
    known = [d for d in dtypes if np.dtype(d) in run.ctx.table]
    least = _least_precise(known)
    run.tol = run.ctx.table[least]
    sizes = [h.size for h in run.float_host] + [math.prod(o.shape) for o in run.out_shapes]
    run.unit = unit_roundoff(least, max(sizes))
    run.eps = float(jnp.finfo(least).eps)
    rng = run.rng(0)
    run.u_host = [rng.standard_normal(o.shape).astype(o.dtype) for o in run.out_shapes]


def to_host(out, cts) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A program's (outputs, cotangents) as lists of NumPy arrays."""
    return [np.asarray(o) for o in jax.tree.leaves(out)], [np.asarray(c) for c in cts]


def call_rule(run: Run) -> None:
    """The rule's output and cotangents in the run's dtype (may raise).

    With a reference to compare, the reference's in the same dtype come from the
    same compiled program (:func:`programs.paired_jit`). If that program fails,
    the rule runs alone, so an error raised here is the rule's; the reference's
    own error is then reported by :func:`reference_vjp`'s caller.
    """
    ctx = run.ctx
    fl, ol = run.put(run.float_host), run.put(run.other_host)
    u = run.put_tree(run.out_treedef, run.u_host)
    traced = functools.partial(programs.vjp, ctx.spec)
    run.spec = ctx.fingerprinted(ctx.spec, "vjp", traced, fl, ol, u)
    if ctx.compares_reference:
        try:
            traced = functools.partial(programs.vjp, ctx.ref_spec)
            ref = ctx.fingerprinted(ctx.ref_spec, "vjp", traced, fl, ol, u)
            run.call = functools.partial(programs.paired_jit, run.spec, ref)
            before = run.spec.traces
            rule, reference = jax.block_until_ready(run.call(fl, ol, u))
        except Exception:  # the rule alone, below, says whether the rule is at fault
            pass
        else:
            run.traces_first = run.spec.traces - before
            run.rule_out, run.rule_cts = to_host(*rule)
            run.ad = to_host(*reference)
            return
    run.call = functools.partial(programs.vjp_jit, run.spec)
    before = run.spec.traces
    out, cts = jax.block_until_ready(run.call(fl, ol, u))
    run.traces_first = run.spec.traces - before
    run.rule_out, run.rule_cts = to_host(out, cts)


def reference_vjp(run: Run, float_leaves, u_leaves, *, in_x64: bool, device=None):
    """The reference's (outputs, cotangents) at ``float_leaves`` with cotangent ``u``."""
    ctx = run.ctx
    with scoped(in_x64, None):
        fl, ol = run.put(float_leaves, device), run.put(run.other_host, device)
        u = run.put_tree(run.out_treedef, u_leaves, device)
        traced = functools.partial(programs.vjp, ctx.ref_spec)
        spec = ctx.fingerprinted(ctx.ref_spec, "vjp", traced, fl, ol, u)
        return to_host(*programs.vjp_jit(spec, fl, ol, u))


def already_float64(run: Run, float_leaves, u_leaves) -> bool:
    """Whether the float64 truth's inputs are the run's own: every float leaf and
    cotangent already float64, on the device the truth is computed on."""
    leaves = [*float_leaves, *u_leaves]
    return run.truth_device() == run.device and all(
        np.asarray(a).dtype == np.float64 for a in leaves
    )


def upcast(leaves) -> list[np.ndarray]:
    return [np.asarray(a, np.float64) for a in leaves]
