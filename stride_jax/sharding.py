"""Device meshes for the stages of STRIDE: small helpers over JAX's own `Mesh` / `NamedSharding`.

Every stage that scales out splits one axis of independent work over a 1-D mesh and replicates
the rest (docs/scaling.md):

| stage | axis name (default) | split | replicated |
|---|---|---|---|
| fit (`fit.Fitter(mesh=)`) | "subsets" | K operator matrices + their Adam state | basis, frozen model, pool states (or split over N) |
| ground truth (`train.train_many(mesh=)`, `groundtruth.run_groundtruth(mesh=)`) | "models" | M models of a chunk (params, optimiser state, batches) | data, frozen parameters |
| measure (`measure.measure(mesh=)`) | "subsets" | K operators | model, queries |
| recovery (`map_queries`) | "queries" | Q queries | design |

A stage asks for its axis by name; a 1-D mesh whose one axis has another name is used as is
(`axis_of`), so one `mesh()` over all devices can serve every stage. No pmap, no scheduler:
placement is `jax.device_put` with a `NamedSharding`, and per-device work is `jax.shard_map`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["mesh", "axis_of", "axis_size", "replicate", "shard_leading", "pad_to_multiple", "map_queries",
           "check_local"]


def mesh(axis: str = "subsets", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `axis` over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("a mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (axis,))


def axis_of(m: Mesh, preferred: str) -> str:
    """`preferred` if `m` has that axis; else the only axis of a 1-D mesh; else a ValueError."""
    if preferred in m.axis_names:
        return preferred
    if len(m.axis_names) == 1:
        return m.axis_names[0]
    raise ValueError(f"mesh axes {m.axis_names} have no {preferred!r} axis; name one {preferred!r} or pass axis=")


def axis_size(m: Mesh, axis: str) -> int:
    return int(m.shape[axis])


def replicate(tree: Any, m: Mesh) -> Any:
    """Every array leaf of `tree` as a full copy on every device of `m` (None leaves stay None)."""
    return jax.device_put(tree, NamedSharding(m, P()))


def shard_leading(tree: Any, m: Mesh, axis: str) -> Any:
    """Every array leaf split along its leading axis over `m[axis]` (which must divide it)."""
    n = axis_size(m, axis)
    for leaf in jax.tree_util.tree_leaves(tree):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
            raise ValueError(f"cannot split a leaf of shape {np.shape(leaf)} over the {n} devices of mesh axis "
                             f"{axis!r}: its leading axis must be a multiple of {n}")
    return jax.device_put(tree, NamedSharding(m, P(axis)))


def pad_to_multiple(x: np.ndarray, n: int) -> np.ndarray:
    """`x` with its last row repeated until its leading axis is a multiple of n."""
    pad = -len(x) % n
    if not pad:
        return x
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])


def check_local(m: Mesh, what: str) -> None:
    """Raise unless every device of `m` belongs to this process."""
    here = jax.process_index()
    others = sorted({d.process_index for d in m.devices.flat} - {here})
    if others:
        raise ValueError(f"{what} needs a mesh of this process's devices (jax.local_devices()), but it spans "
                         f"processes {others}; build it with sharding.mesh(axis, jax.local_devices())")


# ----------------------------------------------------------------------------- recovery over queries


@functools.lru_cache(maxsize=32)
def _query_mapped(fn: Callable, m: Mesh, axis: str, n_sharded: int, n_replicated: int, out_leaves: tuple,
                  out_treedef) -> Callable:
    out_specs = jax.tree_util.tree_unflatten(out_treedef, [P(*([None] * a), axis) for a in out_leaves])
    in_specs = (P(axis),) * n_sharded + (P(),) * n_replicated
    return jax.jit(jax.shard_map(fn, mesh=m, in_specs=in_specs, out_specs=out_specs, check_vma=False))


def map_queries(fn: Callable, y_QxK: Any, m: Mesh, *, axis: str = "queries", args: Sequence[Any] = (),
                replicated: Sequence[Any] = (), out_axes: Any = 0) -> Any:
    """`fn(y_QxK, *args, *replicated)` with the query axis split over `m[axis]`.

    `fn` must treat queries independently (a batched per-query function such as a vmapped
    Lasso): each device runs it on its block of queries. `args` are further arrays with a
    leading query axis (e.g. one lambda per query), split like y; `replicated` are passed whole
    to every device. `out_axes` gives the query axis of each output (an int, or a pytree prefix
    of ints; e.g. `FistaResult(1, 0, 0, 0)` for `recovery.fista_lasso`, whose coef is [N, Q]).
    Q is padded to a multiple of the device count by repeating the last query, and the padding
    is dropped from the outputs. One compile per (fn, mesh, shapes): pass the same `fn` object
    to reuse it.
    """
    axis = axis_of(m, axis)
    n_dev = axis_size(m, axis)
    sharded = [jnp.asarray(y_QxK), *(jnp.asarray(a) for a in args)]
    n_queries = sharded[0].shape[0]
    for a in sharded[1:]:
        if a.shape[:1] != (n_queries,):
            raise ValueError(f"args must have a leading query axis of {n_queries}, got shape {a.shape}")
    pad = -n_queries % n_dev
    if pad:
        sharded = [jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) for a in sharded]
    out_leaves, out_treedef = jax.tree_util.tree_flatten(out_axes)
    mapped = _query_mapped(fn, m, axis, len(sharded), len(replicated), tuple(int(a) for a in out_leaves),
                           out_treedef)
    out = mapped(*shard_leading(sharded, m, axis), *replicate(list(replicated), m))
    if not pad:
        return out
    trim = lambda a, sub: jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, n_queries, axis=a), sub)
    return jax.tree.map(trim, out_axes, out)
