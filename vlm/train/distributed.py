"""Data-parallel training under torchrun: process group set-up from the environment,
rank queries, and gathering tensors across ranks with gradients.

    torchrun --nproc_per_node=2 -m vlm.cli train clip --recipe clip-easyvqa --out runs/clip

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op on one
process. Backend: nccl when CUDA is available, else gloo (CPU).
"""

import os

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (autograd-aware collectives)


def init_from_env() -> None:
    """Join the process group torchrun describes; nothing to do for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Only the main process logs, evaluates, checkpoints and saves."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (N_r, ...) tensor along dim 0, gradients flowing back to
    each rank's own part. Ranks may hold different N_r."""
    if not dist.is_initialized():
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([tensor, tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])])
    parts = torch.distributed.nn.functional.all_gather(padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Like gather_with_grad, for tensors that need no gradient (e.g. token ids)."""
    if not dist.is_initialized():
        return tensor
    with torch.no_grad():
        return gather_with_grad(tensor)


def average(value: float) -> float:
    """The mean of a number over all ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world_size()
