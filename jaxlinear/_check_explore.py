r"""``explore``: the variants of the user's arguments that :func:`jaxlinear.check_vjp`
also checks, so that bugs tied to a shape or a region show up.

* ``x[:1]`` -- a leading-axis slice of size 1 of the batch leaves (a rule wrong
  only for N = 1);
* ``stack(x,x[::-1])`` -- one extra leading axis of size 2 on the batch leaves
  (a rule wrong only for 3-D x, or one dividing by ``x.shape[0]``);
* ``-args`` -- every floating leaf sign-flipped (a rule wrong only for negative
  inputs);
* ``4*args`` -- every floating leaf times 4 (a rule wrong only for |x| > 3:
  saturation, overflow, large-argument branches).

The batch leaves are found, not guessed blindly: the leaves mapped over axis 0
by ``vmap_in_axes`` when given, else candidate groups of leaves sharing a
leading size (the last floating leaf's, largest group first); the first group
that ``fn`` can be vmapped over (one example of it is a valid input, which tells
a batch from parameters that merely share a leading size) and that accepts the
new shapes (``jax.eval_shape``) is used.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Variant:
    """One set of arguments to check: ``host`` holds every leaf of ``args``."""

    name: str
    host: list[np.ndarray]
    detail: str
    new_shapes: bool


def _is_float(a: np.ndarray) -> bool:
    return bool(jnp.issubdtype(a.dtype, jnp.floating))


def _accepts(spec, host, out_structure) -> bool:
    """Whether ``fn`` runs on these leaves and returns the same structure."""
    try:
        out = jax.eval_shape(spec.fn, *jax.tree.unflatten(spec.treedef, host))
    except Exception:  # any refusal means: not a shape fn accepts
        return False
    return jax.tree.structure(out) == out_structure


def _maps_over(spec, host, group) -> bool:
    """Whether ``fn`` accepts one example of ``group`` (``jax.vmap`` over axis 0 of
    those leaves): a batch, not parameters that merely share a leading size."""
    axes = jax.tree.unflatten(spec.treedef, [0 if i in group else None for i in range(len(host))])
    try:
        jax.eval_shape(
            jax.vmap(spec.fn, in_axes=tuple(axes)), *jax.tree.unflatten(spec.treedef, host)
        )
    except Exception:  # fn refuses one example: not a batch
        return False
    return True


def _candidate_groups(host, vmap_in_axes, treedef) -> list[tuple[int, ...]]:
    """Groups of leaf indices that may form the batch, most likely first."""
    groups: list[tuple[int, ...]] = []
    if vmap_in_axes is not None:
        try:
            axes = jax.tree.leaves(
                jax.tree.broadcast(vmap_in_axes, jax.tree.unflatten(treedef, [0] * len(host))),
                is_leaf=lambda a: a is None,
            )
            groups.append(tuple(i for i, a in enumerate(axes) if a == 0))
        except (ValueError, TypeError):  # in_axes that do not broadcast: search instead
            pass
    floats = [i for i, a in enumerate(host) if _is_float(a) and a.ndim >= 1]
    floats.sort(key=lambda i: (host[i].ndim < 2, -i))  # data-like leaves, last first
    for i in floats:
        n = host[i].shape[0]
        shared = [j for j, a in enumerate(host) if a.ndim >= 1 and a.shape[0] == n]
        alike = [j for j in shared if host[j].shape == host[i].shape or not _is_float(host[j])]
        fixed = [j for j in shared if not _is_float(host[j])]
        groups += [tuple(shared), tuple(sorted(set(alike))), tuple(sorted({i, *fixed})), (i,)]
    return [g for g in dict.fromkeys(groups) if g]


def _group_name(names, group) -> str:
    inner = ",".join(names[i] for i in group)
    return inner if len(group) == 1 else f"({inner})"


def _shape_variant(spec, host, names, groups, out_structure, kind):
    """The first group whose leaves fn accepts sliced to [:1] (``kind="slice"``) or
    stacked with their reverse on a new axis 0 (``kind="stack"``)."""
    for group in groups:
        if kind == "slice" and any(host[i].shape[0] == 1 for i in group):
            continue
        new = list(host)
        for i in group:
            a = host[i]
            new[i] = a[:1] if kind == "slice" else np.stack([a, a[::-1]])
        if _maps_over(spec, host, group) and _accepts(spec, new, out_structure):
            g = _group_name(names, group)
            name = f"{g}[:1]" if kind == "slice" else f"stack({g},{g}[::-1])"
            shapes = ", ".join(f"{names[i]}{list(new[i].shape)}" for i in group)
            return Variant(name, new, f"checked at {shapes}", True)
    return None


def _region_variants(host) -> list[Variant]:
    flip = [(-a).astype(a.dtype) if _is_float(a) else a for a in host]
    scale = [(4 * a).astype(a.dtype) if _is_float(a) else a for a in host]
    return [
        Variant("-args", flip, "every floating leaf sign-flipped", False),
        Variant("4*args", scale, "every floating leaf times 4", False),
    ]


def variants(spec, host, names, vmap_in_axes, out_structure) -> tuple[list[Variant], list[str]]:
    """The variants derived from ``host`` (the args' leaves), and a note for each
    shape variant that fn accepts in no form."""
    groups = _candidate_groups(host, vmap_in_axes, spec.treedef)
    found, notes = [], []
    for kind, what in (("slice", "a leading-axis slice of size 1"), ("stack", "an extra axis")):
        v = _shape_variant(spec, host, names, groups, out_structure, kind)
        if v is None:
            notes.append(f"no variant with {what}: fn accepts none (or N is already 1)")
        else:
            found.append(v)
    return found + _region_variants(host), notes
