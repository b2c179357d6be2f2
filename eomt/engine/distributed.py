"""Processes for data-parallel training: spawned locally (`--num-gpus N`) or by torchrun."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
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
        mp.spawn(_worker, args=(num_processes, _free_port(), fn, args), nprocs=num_processes)
    else:
        fn(*args)
