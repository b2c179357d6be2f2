"""BatchNorm whose training statistics cover the batch of every process.

PMT's taps and the dense heads normalise with BatchNorm, which the authors synchronise over
all GPUs (torch's SyncBatchNorm, whose kernels run on GPUs only). `ProcessBatchNorm` computes
the same statistics with torch's differentiable functional all-reduce (whose backward sums the
gradients of every process's loss), on any backend (NCCL, gloo on the CPU), so
that a step of two processes with 2 images each normalises as one process with 4 does. The
trainer swaps it in under DDP (`sync_batch_norms`); with one process it is plain BatchNorm.
"""

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed._functional_collectives import all_reduce

from eomt import distributed as dist


class ProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, ...) inputs with statistics over all processes' batches in
    training (float32, as autocast runs BatchNorm); the running statistics follow them."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of (N, C, ...), got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch_dist.is_initialized() and dist.world_size() > 1):
            return super().forward(x)
        x = x.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]), "sum", torch_dist.group.WORLD)
        n = total[-1]
        mean = total[:-1] / n
        centered = x - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims), "sum", torch_dist.group.WORLD) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batch_norms(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` as a `ProcessBatchNorm` holding the very same parameters and
    buffers (an optimizer built before keeps working; checkpoints keep their names); returns
    `module`, changed in place."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            synced = ProcessBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            for key, tensor in [*child.named_parameters(), *child.named_buffers()]:
                setattr(synced, key, tensor)
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            sync_batch_norms(child)
    return module
