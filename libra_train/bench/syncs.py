"""Count host-device synchronisations of a piece of code, on any device (CPU included).

On a GPU every read of a device value by the host (``int(t)``, ``bool(t)``, ``t.tolist()``, ``torch.equal``,
``nonzero``, boolean-mask indexing) stalls the CPU until the GPU has caught up, so the kernel launches queued
behind it become idle time. ``torch.cuda.set_sync_debug_mode`` reports them on CUDA only; this
``TorchDispatchMode`` sees the same operators on CPU too, so the sync budget of the plug-in is a deterministic
count that a CPU test can pin (``tests/plugin/test_syncs.py``).

Counted, per operator: ``aten._local_scalar_dense`` (``item``/``int``/``bool`` of one value, and ``tolist``'s
per-element reads), ``aten.equal``, ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*`` and ``aten.index``
with a boolean index (their output size depends on the data), and copies between host and device
(``aten._to_copy`` to another device or explicitly to ``cpu``, ``aten.copy_`` across devices); tensors built from host data
(``torch.tensor(...)``, ``aten.lift_fresh``) are counted apart in ``host_tensors``: transformers itself makes
some in every forward, and on a GPU each becomes a copy only where it is moved to the device.

    with SyncCounter() as syncs:
        model(**batch)
    print(syncs.total, syncs.by_op)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {
    "aten._local_scalar_dense",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique_consecutive",
    "aten._unique2",
}


def _op_name(packet) -> str:
    return f"{packet._qualified_op_name.replace('::', '.')}"


def _crosses_devices(name: str, args, kwargs) -> bool:
    """A copy between host and device: to a GPU from host memory, or to host memory by an explicit ``device``.

    On a CPU-only run ``t.cpu()`` is free and invisible, so the plug-in reads values to the host with
    ``t.to("cpu", copy=True)`` (``libra_train.plugin.host.to_host``), which shows here as a copy *to* ``cpu``.
    """
    if name == "aten._to_copy":
        device = (kwargs or {}).get("device")
        if device is None:
            return False
        device, source = torch.device(device), args[0]
        if (device.type == "cpu") != (source.device.type == "cpu"):
            return True
        # CPU run: an explicit copy to host memory that keeps the dtype is a host read (a dtype cast is not)
        return device.type == "cpu" and kwargs.get("dtype", source.dtype) == source.dtype
    if name == "aten.copy_":
        return args[0].device.type != args[1].device.type
    return False


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """Count the operators that need a host-device synchronisation while the mode is active.

    Attributes:
        by_op: operator name -> count.
        total: all of them.
        host_tensors: tensors built from host data (not in ``total``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.host_tensors = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func.overloadpacket)
        if (
            name in _ALWAYS
            or (name == "aten.index" and _bool_index(args))
            or _crosses_devices(name, args, kwargs)
        ):
            self.by_op[name] += 1
        elif name == "aten.lift_fresh":
            self.host_tensors += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __repr__(self) -> str:
        return f"SyncCounter(total={self.total}, {dict(self.by_op)})"


def count_syncs(fn, *args, **kwargs) -> tuple[object, SyncCounter]:
    """Run ``fn(*args, **kwargs)`` under a :class:`SyncCounter`; return its result and the counter."""
    with SyncCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter
