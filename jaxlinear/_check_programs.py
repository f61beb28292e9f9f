r"""The compiled programs of :func:`jaxlinear.check_vjp`.

* :func:`vjp_jit`: ``(fn(*args), vjp(u))`` of a rule or a reference;
* :func:`paired_jit`: that of the rule and of the reference in one program (the
  checker compiles the two for the same inputs: XLA compiles what they compute
  alike once, and the program's fixed cost is paid once);
* :func:`vmapped_jit`: :func:`vjp` under ``jax.vmap``; :func:`vmapped_pair_jit`,
  the rule's and the reference's;
* :func:`differences_jit`: float64 central differences of
  φ(x) = ⟨u, fn(x)⟩ along stacks of perturbations p of each leaf,
  ``φ(x + p) − φ(x − p)``, one p at a time (one ``lax.map`` for every leaf);
  with ``batched``, over a stack of examples, each evaluated alone (``lax.map``
  again), so the truth never depends on fn's own batching;
* :func:`truths_jit`: the float64 truths of one run, the reference's vjp and
  the unbatched differences, in one program.

Programs are cached by JAX's jit on a :class:`Spec` (static) and the avals: the
float64 programs are shared by every dtype a rule is checked in.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Spec:
    """Static description of ``fn`` applied to a flattened ``args``: the jit cache key.

    Two specs are equal when they hold the same ``fn`` object, argument structure
    and ``fingerprint`` -- a digest of what ``fn`` computes (see
    :func:`fingerprint`) -- so repeated checks of one function reuse compiled
    code, but a rule changed in place (``defvjp`` again on the same
    ``custom_vjp``) is compiled afresh. ``traces`` counts the traces of
    :func:`vjp_jit` made with this object.
    """

    def __init__(self, fn, treedef, float_idx, other_idx, digest: str = ""):
        self.fn, self.treedef = fn, treedef
        self.float_idx, self.other_idx = tuple(float_idx), tuple(other_idx)
        self.digest = digest
        self.traces = 0

    def with_digest(self, digest: str) -> Spec:
        return Spec(self.fn, self.treedef, self.float_idx, self.other_idx, digest)

    def _key(self):
        return (id(self.fn), self.treedef, self.float_idx, self.other_idx, self.digest)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Spec) and self.fn is other.fn and self._key() == other._key()

    def assemble(self, float_leaves, other_leaves):
        leaves = [None] * (len(self.float_idx) + len(self.other_idx))
        for i, a in zip(self.float_idx, float_leaves, strict=True):
            leaves[i] = a
        for i, a in zip(self.other_idx, other_leaves, strict=True):
            leaves[i] = a
        return jax.tree.unflatten(self.treedef, leaves)

    def split(self, args):
        leaves = self.treedef.flatten_up_to(args)
        return [leaves[i] for i in self.float_idx], [leaves[i] for i in self.other_idx]

    def call(self, float_leaves, other_leaves):
        return self.fn(*self.assemble(float_leaves, other_leaves))


def fingerprint(f: Callable, *args) -> str:
    """A digest of what ``f`` computes on ``args``' shapes: its jaxpr's text and its
    constants' bytes, traced through a fresh wrapper so that no trace cache of
    JAX's (keyed on function identity) hands back an out-of-date jaxpr."""
    closed = jax.make_jaxpr(lambda *a: f(*a))(*args)
    digest = hashlib.sha256(str(closed.jaxpr).encode())
    for c in closed.consts:
        a = np.asarray(c)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def vjp(spec: Spec, float_leaves, other_leaves, cotangent):
    """``(fn(*args), vjp(cotangent))`` w.r.t. the float leaves; other leaves held fixed."""
    out, pullback = jax.vjp(lambda fl: spec.call(fl, other_leaves), list(float_leaves))
    (cts,) = pullback(cotangent)
    return out, cts


@functools.partial(jax.jit, static_argnums=0)
def vjp_jit(spec: Spec, float_leaves, other_leaves, cotangent):
    """:func:`vjp` compiled; ``spec.traces`` counts its traces."""
    spec.traces += 1  # runs at trace time only
    return vjp(spec, float_leaves, other_leaves, cotangent)


@functools.partial(jax.jit, static_argnums=(0, 1))
def paired_jit(rule: Spec, reference: Spec, float_leaves, other_leaves, cotangent):
    """``(vjp of the rule, vjp of the reference)``, each as :func:`vjp` gives it, in one
    compiled program; ``rule.traces`` counts its traces."""
    rule.traces += 1  # runs at trace time only
    return tuple(vjp(s, float_leaves, other_leaves, cotangent) for s in (rule, reference))


def vmapped(spec: Spec, in_axes, batched_args, cotangents):
    """``jax.vmap`` of :func:`vjp` over ``in_axes`` of the args and axis 0 of the
    cotangents; every cotangent comes out per example (axis 0)."""

    def per_example(args, u):
        fl, ol = spec.split(args)
        return vjp(spec, fl, ol, u)

    return jax.vmap(per_example, in_axes=(in_axes, 0))(batched_args, cotangents)


vmapped_jit = jax.jit(vmapped, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def vmapped_pair_jit(rule: Spec, reference: Spec, in_axes, batched_args, cotangents):
    """:func:`vmapped` of the rule and of the reference in one compiled program."""
    return tuple(vmapped(s, in_axes, batched_args, cotangents) for s in (rule, reference))


def _inner(out, cotangent):
    """⟨u, out⟩ and Σ|u|·|out| over every output leaf, in u's dtype."""
    pairs = list(zip(jax.tree.leaves(out), jax.tree.leaves(cotangent), strict=True))
    dot = functools.reduce(operator.add, [jnp.sum(o.astype(u.dtype) * u) for o, u in pairs])
    size = functools.reduce(
        operator.add, [jnp.sum(jnp.abs(o.astype(u.dtype)) * jnp.abs(u)) for o, u in pairs]
    )
    return dot, size


def _perturbed(float_leaves, stacks, t, sign):
    """The float leaves with perturbation ``t`` of the concatenated stacks added (times
    ``sign``) to the one leaf it belongs to; every other leaf exactly as it is."""
    leaves, start = [], 0
    for x, stack in zip(float_leaves, stacks, strict=True):
        count = stack.shape[0]
        mine = (t >= start) & (t < start + count)
        p = lax.dynamic_index_in_dim(stack, jnp.clip(t - start, 0, count - 1), keepdims=False)
        leaves.append(jnp.where(mine, x + sign * p, x))
        start += count
    return leaves


def differences(spec: Spec, batched: bool, float_leaves, other_leaves, cotangent, stacks):
    """``(Σ|u|·|fn(x)|, [φ(x + p) − φ(x − p) for p in stacks[j]] for each leaf j)``.

    Unbatched: φ is a scalar, returned with shape (1,). Batched: every leaf and
    the cotangent carry a leading axis of examples, φ is one value per example
    (shape (B,)), and each perturbation p moves every example at once.

    One ``lax.map`` runs over every ±p of every leaf, so ``fn`` is compiled into
    the program twice (for Σ|u|·|fn(x)| and for the map's body) however many
    leaves it has, rather than twice per leaf.
    """

    def phi(fl):
        if not batched:
            dot, size = _inner(spec.call(fl, other_leaves), cotangent)
            return dot[None], size[None]

        def one(example):
            ex_fl, ex_ol, ex_u = example
            return _inner(spec.call(ex_fl, ex_ol), ex_u)

        return lax.map(one, (list(fl), list(other_leaves), cotangent))

    counts = [stack.shape[0] for stack in stacks]
    total = sum(counts)
    signs = jnp.concatenate([jnp.ones(total), -jnp.ones(total)]).astype(float_leaves[0].dtype)
    ts = jnp.concatenate([jnp.arange(total), jnp.arange(total)])

    def evaluate(item):
        t, sign = item
        return phi(_perturbed(float_leaves, stacks, t, sign))[0]

    values = lax.map(evaluate, (ts, signs))
    diffs = values[:total] - values[total:]
    size = phi(list(float_leaves))[1]
    offsets = np.cumsum([0, *counts])
    return size, [diffs[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


differences_jit = jax.jit(differences, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def truths_jit(reference: Spec, spec: Spec, float_leaves, other_leaves, cotangent, stacks):
    """The float64 truths of one run in one program: ``(vjp of the reference,
    unbatched differences of fn)`` (:func:`vjp`, :func:`differences`)."""
    return (
        vjp(reference, float_leaves, other_leaves, cotangent),
        differences(spec, False, float_leaves, other_leaves, cotangent, stacks),
    )
