"""Processes, device mesh and shardings for the train loop (FSDP x tensor parallelism).

The train step is built the big_vision way: ``jax.eval_shape`` gives the
abstract train state, :func:`state_sharding` its shardings, and
``jax.jit(step, in_shardings=..., out_shardings=..., donate_argnums=...)``
runs it on a :func:`make_mesh` mesh; each process feeds its slice of the
global batch through :func:`global_batch`:

  >>> initialize()                                   # no-op for one process
  >>> mesh = make_mesh({"data": -1, "model": 1})
  >>> abstract = jax.eval_shape(init_state, jax.random.key(0))     # doctest: +SKIP
  >>> shardings = state_sharding(abstract, mesh)                   # doctest: +SKIP
  >>> rows = process_slice(global_batch_size=128, mesh=mesh)
  >>> batch = global_batch({"image": images[rows]}, mesh)          # doctest: +SKIP

Several processes (one per host) each run the same program. On CPU their
collectives go through gloo, JAX's default ``jax_cpu_collectives_implementation``
(checked with JAX 0.10.2), so nothing needs configuring.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.types import PyTree

__all__ = [
  "batch_sharding",
  "global_batch",
  "initialize",
  "make_mesh",
  "param_sharding",
  "process_slice",
  "state_sharding",
]


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
  *,
  auto_detect: bool = False,
  initialization_timeout: int = 300,
) -> None:
  """Starts JAX's multi-process runtime; a no-op for a single process.

  Call it first, before anything touches a device. It does nothing when
  ``num_processes == 1``, or when no argument is given, ``auto_detect`` is
  false and the ``JAX_COORDINATOR_ADDRESS`` environment variable is unset (a
  plain single-process run). Calling it again is a no-op.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator.
    num_processes: the number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: the local devices this process uses (default: all).
    auto_detect: with no other argument, let JAX read the cluster's
      environment (SLURM, Open MPI, Cloud TPU, ...), as
      ``jax.distributed.initialize()`` does.
    initialization_timeout: seconds to wait for all processes to connect.

  Raises:
    RuntimeError: JAX is already initialised with another process count.
  """
  if jax.distributed.is_initialized():
    if num_processes is not None and num_processes != jax.process_count():
      raise RuntimeError(
        f"JAX is already initialised with {jax.process_count()} process(es), not {num_processes}"
      )
    return
  explicit = (coordinator_address, num_processes, process_id, local_device_ids)
  if num_processes == 1 or (
    all(a is None for a in explicit)
    and not auto_detect
    and not os.environ.get("JAX_COORDINATOR_ADDRESS")
  ):
    return
  jax.distributed.initialize(
    coordinator_address,
    num_processes,
    process_id,
    local_device_ids,
    initialization_timeout=initialization_timeout,
  )
  if jax.process_index() == 0:
    logging.info(
      "JAX distributed: %d processes, %d devices (%d local)",
      jax.process_count(),
      jax.device_count(),
      jax.local_device_count(),
    )


def make_mesh(
  mesh_shape: Mapping[str, int] | None = None, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A device mesh with named axes, e.g. ``{"data": -1, "model": 2}``.

  Args:
    mesh_shape: axis name -> size, in mesh order; one size may be ``-1`` for
      all remaining devices. Default: every device on ``"data"``.
    devices: the devices (default: all devices of all processes).

  Returns:
    A ``jax.sharding.Mesh`` with ``Auto`` axes (shardings propagate as in
    ``jax.jit``), laid out by ``jax.make_mesh`` for the device topology.

  Raises:
    ValueError: the sizes do not multiply to the number of devices.
  """
  mesh_shape = dict(mesh_shape or {"data": -1})
  n = len(devices) if devices is not None else jax.device_count()
  sizes = list(mesh_shape.values())
  if (
    not sizes
    or any(not isinstance(s, int) or (s < 1 and s != -1) for s in sizes)
    or (sizes.count(-1) > 1)
  ):
    raise ValueError(
      f"mesh_shape must map axis names to positive sizes, with at most one "
      f"-1 (the remaining devices); got {mesh_shape}"
    )
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh_shape {mesh_shape}: {n} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh_shape {mesh_shape} needs {math.prod(sizes)} devices; there are {n}")
  names = tuple(mesh_shape)
  return jax.make_mesh(
    tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices
  )


def _axis_size(mesh: Mesh, axis: str | None) -> int:
  return mesh.shape.get(axis, 1) if axis is not None else 1


def _param_spec(
  shape: tuple[int, ...], mesh: Mesh, fsdp_axis: str | None, tp_axis: str | None, min_size: int
) -> P:
  if len(shape) < 2 or math.prod(shape) < min_size:
    return P()
  spec: list[str | None] = [None] * len(shape)
  if _axis_size(mesh, tp_axis) > 1 and shape[-1] % _axis_size(mesh, tp_axis) == 0:
    spec[-1] = tp_axis
  fsdp = _axis_size(mesh, fsdp_axis)
  if fsdp > 1 and fsdp_axis not in spec:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
    if free:
      spec[max(free, key=lambda i: (shape[i], -i))] = fsdp_axis
  return P(*spec)


def param_sharding(
  abstract_params: PyTree,
  mesh: Mesh,
  *,
  fsdp_axis: str | None = "data",
  tp_axis: str | None = "model",
  min_size: int = 2**14,
) -> PyTree:
  """A ``NamedSharding`` per parameter: FSDP over ``fsdp_axis``, tensor parallel over ``tp_axis``.

  Rules, by shape only (so equal shapes get equal shardings):

  * tensors with fewer than ``min_size`` elements, and 1-D tensors (biases,
    norm scales), are replicated;
  * otherwise the last (output) axis is split over ``tp_axis`` if that mesh
    axis has more than one device and divides it;
  * and the largest remaining axis that ``fsdp_axis`` divides (the first of
    equal ones) is split over ``fsdp_axis``, if that axis has more than one
    device.

  A mesh axis missing from ``mesh`` (or ``None``) counts as size 1. Every spec
  is valid: each mesh axis used at most once, only on dimensions it divides.

  Args:
    abstract_params: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    mesh: the device mesh.
    fsdp_axis: the mesh axis that splits parameters (ZeRO-3 style).
    tp_axis: the mesh axis that splits output channels.
    min_size: tensors smaller than this are replicated.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``abstract_params``.
  """
  return jax.tree.map(
    lambda x: NamedSharding(
      mesh, _param_spec(tuple(np.shape(x)), mesh, fsdp_axis, tp_axis, min_size)
    ),
    abstract_params,
  )


def _path(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def state_sharding(
  abstract_state: PyTree,
  mesh: Mesh,
  param_shardings_fn: Callable[[PyTree, Mesh], PyTree] = param_sharding,
  *,
  params_key: str | None = "params",
) -> PyTree:
  """A ``NamedSharding`` per train-state leaf: like the parameters, else replicated.

  The parameters are ``abstract_state[params_key]`` (the whole state when
  that key is absent or ``params_key`` is None), sharded by
  ``param_shardings_fn(params, mesh)``. Every other leaf of the same shape as
  a parameter is sharded like it: like the parameter whose path ends its own
  path (the optimizer moments ``opt_state/0/mu/<param path>``, TPGM anchors,
  FTP buffers mirror the params tree), else like a parameter of that shape
  when all parameters of that shape are sharded alike. Scalars and all other
  leaves (radii, step, RNG key data) are replicated.

  Args:
    abstract_state: the train state as arrays or ``jax.ShapeDtypeStruct``
      (e.g. from ``jax.eval_shape``); empty nodes such as
      ``optax.MaskedNode()`` are kept.
    mesh: the device mesh.
    param_shardings_fn: params, mesh -> shardings; default
      :func:`param_sharding` with its default rules.
    params_key: the key of the parameters in ``abstract_state``.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``abstract_state``,
    for ``jax.jit(..., in_shardings=..., out_shardings=...)``.
  """
  if (
    params_key is not None
    and isinstance(abstract_state, Mapping)
    and (params_key in abstract_state)
  ):
    params = abstract_state[params_key]
  else:
    params = abstract_state
  flat_params, _ = jax.tree_util.tree_flatten_with_path(params)
  flat_shardings = jax.tree.leaves(
    param_shardings_fn(params, mesh), is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
  )
  by_path, by_shape = {}, {}
  for (path, leaf), sharding in zip(flat_params, flat_shardings):
    shape = tuple(np.shape(leaf))
    by_path[_path(path)] = (shape, sharding)
    by_shape.setdefault(shape, set()).add(sharding)
  replicated = NamedSharding(mesh, P())

  def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    shape, keys = tuple(np.shape(leaf)), _path(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[0] == shape:
        return match[1]
    alike = by_shape.get(shape, set())
    return next(iter(alike)) if len(alike) == 1 and shape else replicated

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
  """The batch's leading axis split over ``data_axis``, the rest replicated."""
  return NamedSharding(mesh, P(data_axis))


def process_slice(
  global_batch_size: int, mesh: Mesh | None = None, data_axis: str = "data"
) -> slice:
  """The rows of the global batch that this process loads and passes to :func:`global_batch`.

  With a ``mesh``, these are the rows that this process's devices hold under
  :func:`batch_sharding` (several processes get the same rows when
  ``data_axis`` does not span them all); without one, the batch is split
  evenly in process order.

  Raises:
    ValueError: the batch size is not divisible by the number of shards, or
      this process's rows are not contiguous under the mesh's device order.
  """
  if mesh is None:
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
      raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the {count} processes"
      )
    size = global_batch_size // count
    return slice(index * size, (index + 1) * size)
  shards = _axis_size(mesh, data_axis)
  if global_batch_size % shards:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the "
      f"{shards} devices of mesh axis {data_axis!r}"
    )
  indices = batch_sharding(mesh, data_axis).addressable_devices_indices_map((global_batch_size,))
  rows = sorted(
    {
      (i[0].start or 0, global_batch_size if i[0].stop is None else i[0].stop)
      for i in indices.values()
    }
  )
  if any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
    raise ValueError(
      f"process {jax.process_index()} holds the non-contiguous rows {rows} of "
      "the batch; order the mesh devices by process"
    )
  return slice(rows[0][0], rows[-1][1])


def global_batch(
  local_batch: Mapping[str, np.ndarray], mesh: Mesh, data_axis: str = "data"
) -> dict[str, jax.Array]:
  """One global ``jax.Array`` per entry, from each process's rows of the batch.

  Each process passes the rows ``process_slice(global_batch_size, mesh,
  data_axis)`` of every entry (all of it with one process); the result is
  split over ``data_axis`` by :func:`batch_sharding`.
  """
  sharding = batch_sharding(mesh, data_axis)
  out = {}
  for name, x in local_batch.items():
    if np.ndim(x) < 1:
      raise ValueError(
        f"batch entry {name!r} must have a leading batch axis; got shape {np.shape(x)}"
      )
    out[name] = jax.make_array_from_process_local_data(sharding, x)
  return out


def data_layout(batch_size: int, mesh: Mesh) -> dict[str, int]:
  """This process's ``process_index``/``process_count`` in the input pipeline's even split of
  a global batch: the rows its devices hold (:func:`process_slice`)."""
  rows = process_slice(batch_size, mesh)
  local = rows.stop - rows.start
  return {"process_index": rows.start // local, "process_count": batch_size // local}
