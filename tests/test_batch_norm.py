"""ProcessBatchNorm: statistics and gradients over every process's batch, as one batch."""

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from eomt.modeling.batch_norm import ProcessBatchNorm, sync_batch_norms


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 1, 1))


def batch() -> torch.Tensor:
    return torch.randn(4, 3, 3, 2, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, world: int, init_file: str, result: str) -> None:
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    net = sync_batch_norms(network())
    half = batch()[2 * rank : 2 * rank + 2]
    net(half).sum().backward()
    grad = net[0].weight.grad.clone()
    torch_dist.all_reduce(grad)  # the sum of both processes' losses, as DDP sums (then scales)
    if rank == 0:
        torch.save({"grad": grad, **net[1].state_dict()}, result)
    torch_dist.destroy_process_group()


def test_two_processes_normalise_and_differentiate_as_one_batch(tmp_path):
    reference = network()
    reference(batch()).sum().backward()
    result = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2)
    two = torch.load(result)
    torch.testing.assert_close(two["grad"], reference[0].weight.grad, rtol=1e-5, atol=1e-6)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(two[key], reference[1].state_dict()[key])


def test_swapping_keeps_the_parameters_and_one_process_is_plain_batch_norm():
    net = network()
    weight, running_mean = net[1].weight, net[1].running_mean
    sync_batch_norms(net)
    assert isinstance(net[1], ProcessBatchNorm)
    assert net[1].weight is weight and net[1].running_mean is running_mean
    torch.testing.assert_close(net(batch()), network()(batch()))
