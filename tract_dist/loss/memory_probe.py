"""Peak tensor memory of a callable, on CPU as well as on CUDA (used by the memory test and benchmark).

CPU: torch has no allocator statistics for CPU tensors, and RSS high-water marks are blurred by glibc's
caching and by the interpreter. With ``profile_memory=True`` torch's CPU allocator reports every
allocation and free (size and address) to the profiler; summing those events in time order gives the
exact peak of live CPU tensor bytes allocated inside the window (tensors that existed before it, e.g.
the inputs, are not counted; tensors that outlive it, e.g. the gradients, are). Not counted: memory
that libraries allocate outside torch's allocator (oneDNN/BLAS scratch). CUDA: max_memory_allocated.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def peak_tensor_bytes(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn`` and return (its result, peak bytes of tensors allocated during the call)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return result, peak
