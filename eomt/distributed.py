"""Processes for data-parallel training and evaluation: spawned locally (`--num-gpus N`) or by
torchrun, and the few collectives the trainer and the evaluators use. Outside a process group
every helper is the single-process identity. Torch is imported where it is needed: evaluating
files never needs it (a process that has not imported torch is in no process group).
"""

import os
import socket
import sys
from typing import Any


def _group():
    """torch.distributed when this process is in a process group, else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    return rank() == 0


def device():
    """The torch.device of this process: its GPU (LOCAL_RANK) or the CPU. A process given GPUs
    (CUDA_VISIBLE_DEVICES names some) that sees none stops, rather than run on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1":
        raise RuntimeError(
            f"CUDA_VISIBLE_DEVICES={visible} gives this process GPUs, but PyTorch sees none "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): stopping rather "
            "than training on the CPU"
        )
    return torch.device("cpu")


def gather_objects(local: Any) -> list[Any]:
    """Every process's `local` (one `all_gather_object`), in rank order; `[local]` alone."""
    if world_size() == 1:
        return [local]
    gathered = [None] * world_size()
    _group().all_gather_object(gathered, local)
    return gathered


def sum_over_processes(count: int, on) -> int:
    if world_size() == 1:
        return count
    import torch

    total = torch.tensor(count, device=on)
    _group().all_reduce(total)
    return int(total.item())


def mean_over_processes(values: dict[str, float], on) -> dict[str, float]:
    """Each value averaged over the processes (float64), the same on every one."""
    if world_size() == 1:
        return values
    import torch

    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=on)
    _group().all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def _worker(local_rank: int, num_processes: int, port: int, fn, args) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(num_processes),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    _run_in_group(fn, args)


def _run_in_group(fn, args) -> None:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(_backend())
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn, num_processes: int, args: tuple = ()) -> None:
    """Run fn(*args) in `num_processes` processes on this machine (one per GPU; on a CPU-only
    machine they share the CPU over gloo). Under torchrun (WORLD_SIZE set) join its group."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        _run_in_group(fn, args)
    elif num_processes > 1:
        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(num_processes, _free_port(), fn, args), nprocs=num_processes)
    else:
        fn(*args)
