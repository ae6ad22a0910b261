"""One process per device under `torchrun`: who we are (rank, world size, device) and the few collectives
the trainer needs. Without torchrun's environment everything here is a no-op on one process.

    torchrun --nproc_per_node 8 -m regionbert.train.cli configs/base.toml ...      # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 ...    # two nodes

NCCL on GPUs, gloo on CPUs. Every rank builds the same model from the same seed (DDP also broadcasts
rank 0's weights), reads its own batches (train/data.py: TaskSampler(rank, world_size)) and trains
the same task at each step; only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Dist()  # one process on the CPU: the default wherever a Dist is optional


def init_distributed(device: str = "auto") -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, start the process group and pick this rank's device
    (cuda:LOCAL_RANK, or the CPU). device: auto, cpu, cuda or cuda:N (N only without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"run.device={device!r} but CUDA is not available here")
    if device.startswith("cuda"):
        dev = torch.device("cuda", local) if world > 1 or device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def close_distributed(wait: bool = True) -> None:
    """Leave together (wait: a rank tearing down gloo while another still talks to it can abort the
    process); after an error on this rank, leave at once (the others may never reach a barrier)."""
    if dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_tensors(t: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """[rank 0's t, rank 1's t, ...] on every rank (t has the same shape everywhere)."""
    if not d.enabled:
        return [t]
    out = [torch.empty_like(t) for _ in range(d.world_size)]
    dist.all_gather(out, t.contiguous())
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in order: equal on all ranks iff the replicas agree."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def digests_agree(model: torch.nn.Module, d: Dist) -> list[str]:
    """Every rank's parameter digest (rank order), gathered on every rank."""
    mine = torch.tensor(list(bytes.fromhex(parameter_digest(model))), dtype=torch.uint8, device=d.device)
    return [bytes(t.cpu().tolist()).hex() for t in gather_tensors(mine, d)]
