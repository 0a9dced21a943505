"""Peak memory of one measurement: CUDA max allocated on GPU, the process's peak RSS on CPU.

CPU: Linux keeps the peak resident set size in ``VmHWM`` (``/proc/self/status``); writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS, so the peak of one block is measurable inside a
long-lived process. Before the reset, freed memory is handed back to the OS (``gc.collect`` + glibc's
``malloc_trim``), so that a previous, larger measurement does not linger in the RSS. Where the reset is not
possible (not Linux, no permission) the process-lifetime ``ru_maxrss`` is reported and labelled as such.
The RSS counts everything resident: weights, optimizer state, gradients, activations, the Python heap.
``start_mib`` (resident at entry: weights + optimizer state) is reported beside the peak, so that
``peak - start`` is what the measured calls added.

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, not the caching
allocator's reserve or the CUDA context).

Used by the benchmark (`libra_train.bench.compare`) and by ``evaluate`` (`libra_train.inference.evaluation`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import re
import resource
import sys

import torch


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError, ValueError):
        return None


def release_memory(device: torch.device | None = None) -> None:
    """Free what Python and the allocators hold but no longer use (glibc ``malloc_trim``, CUDA cache)."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


_LABELS = {
    "peak_rss": "peak RSS",
    "peak_rss_process_lifetime": "peak RSS (process lifetime)",
    "cuda_max_allocated": "CUDA max allocated",
}


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.peak_mib``, ``mem.start_mib``, ``mem.kind``."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.kind, self.peak_mib, self.start_mib = "", 0.0, 0.0

    def __enter__(self) -> PeakMemory:
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind, self.start_mib = "cuda_max_allocated", torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.kind = "peak_rss_process_lifetime"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.kind = "peak_rss"
        except OSError:
            pass
        self.start_mib = (_vm_hwm_kib() or 0) / 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "peak_rss":
            self.peak_mib = (_vm_hwm_kib() or 0) / 1024
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            self.peak_mib = maxrss / (2**20 if sys.platform == "darwin" else 1024)

    @property
    def label(self) -> str:
        """``kind`` for people: "peak RSS", "CUDA max allocated", ..."""
        return _LABELS.get(self.kind, self.kind)

    def as_dict(self) -> dict[str, float | str]:
        return {"kind": self.kind, "peak_mib": round(self.peak_mib, 1), "start_mib": round(self.start_mib, 1)}


class SavedForBackward:
    """Bytes of the activations autograd saves for backward inside the block (parameters excluded).

    Device-independent (the same count on CPU and GPU), so the activation saving of compression is visible
    without a GPU allocator: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor a forward keeps for
    its backward; each storage is counted once (views of one storage share it), and the storages of the
    model's parameters (weights saved by matmuls) are left out, since they are the same for every method.

        with SavedForBackward(model) as saved:
            loss = model(**batch).loss
        saved.mib, saved.tensors
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self._params = (
            {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        )
        self._seen: set[tuple[torch.device, int]] = set()
        self.bytes = 0
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in self._seen and storage.data_ptr() not in self._params:
            self._seen.add(key)
            self.bytes += storage.nbytes()
            self.tensors += 1
        return t

    @property
    def mib(self) -> float:
        return self.bytes / 2**20

    def __enter__(self) -> SavedForBackward:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
