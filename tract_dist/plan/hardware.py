"""Accelerators the planner sizes for: memory, dense bf16 peak and memory bandwidth, each with its source.

The peaks are the vendors' datasheet figures for dense (not 2:4-sparse) bf16 tensor-core math; memory is what
``torch.cuda.get_device_properties(0).total_memory`` reports (a little less than the marketing number: the
driver keeps some), which is what PyTorch's allocator can hand out at most.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    hbm_tb_s: float  # peak memory bandwidth, 10^12 bytes/s
    source: str


ACCELERATORS: dict[str, Accelerator] = {
    "h100-80gb": Accelerator("NVIDIA H100 SXM5 80GB", 79.19, 989.4, 3.35,
                             "NVIDIA H100 datasheet (SXM5): 989 TFLOP/s dense BF16, 3.35 TB/s HBM3; memory as torch "
                             "reports it on an H100 80GB HBM3"),
    "h200-141gb": Accelerator("NVIDIA H200 SXM 141GB", 139.8, 989.4, 4.8,
                              "NVIDIA H200 datasheet: the H100's 989 TFLOP/s dense BF16, 4.8 TB/s HBM3e; memory as "
                              "torch reports it"),
    "a100-80gb": Accelerator("NVIDIA A100 SXM4 80GB", 79.15, 312.0, 2.039,
                             "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16, 2,039 GB/s HBM2e (80GB SXM)"),
    "a100-40gb": Accelerator("NVIDIA A100 SXM4 40GB", 39.39, 312.0, 1.555,
                             "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16, 1,555 GB/s HBM2 (40GB)"),
    "l40s-48gb": Accelerator("NVIDIA L40S 48GB", 44.39, 362.05, 0.864,
                             "NVIDIA L40S datasheet: 362 TFLOP/s dense BF16, 864 GB/s GDDR6"),
}
DEFAULT_ACCELERATOR = "h100-80gb"  # the project's large configs are sized for nodes of 8 x 80 GB


def accelerator(name: str | None, memory_gib: float | None = None) -> Accelerator:
    """The named accelerator (None: this machine's CUDA device when it has one and it is in the table by memory,
    else the default), with ``memory_gib`` overriding its memory."""
    from dataclasses import replace

    acc = ACCELERATORS.get(name or "") if name else _local_or_default()
    if acc is None:
        raise KeyError(name)
    return replace(acc, memory_gib=memory_gib) if memory_gib else acc


def _local_or_default() -> Accelerator:
    """The local CUDA device when one is present (its real memory; peaks from the closest table entry)."""
    from dataclasses import replace

    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            mem = props.total_memory / GIB
            closest = min(ACCELERATORS.values(), key=lambda a: abs(a.memory_gib - mem))
            return replace(closest, name=props.name, memory_gib=mem,
                           source=f"this machine's {props.name} ({mem:.2f} GiB); peaks of {closest.name}: "
                                  f"{closest.source}")
    except Exception:  # noqa: BLE001 - no usable CUDA: plan for the default card
        pass
    return ACCELERATORS[DEFAULT_ACCELERATOR]
