"""AdamW with layer-wise lr decay, and the poly (or cosine) schedule with the two-stage warm-up.

New parameters (queries, heads, upscaling) warm up first while the backbone's lr stays 0; then
the backbone warms up; then every lr decays to 0 at the last iteration, polynomially (EoMT)
or along a half cosine (PMT).
"""

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def backbone_lr_scale(name: str, num_blocks: int, llrd: float) -> float:
    """Lr multiplier of a backbone parameter: llrd^(depth from the top) for block parameters,
    the same as block 0 for the embeddings, none for the final norm."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return llrd ** (num_blocks - 1 - int(parts[1]))
    if parts[0] == "norm":
        return 1.0
    return llrd ** (num_blocks - 1)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, llrd: float):
    """AdamW over two kinds of parameter groups; each group records `is_backbone`."""
    backbone = model.backbone
    num_blocks = len(backbone.blocks)
    backbone_ids = {id(p) for p in backbone.parameters()}
    groups: dict[tuple[bool, float], list] = {}
    for name, param in backbone.named_parameters():
        if param.requires_grad:
            key = (True, backbone_lr_scale(name, num_blocks, llrd))
            groups.setdefault(key, []).append(param)
    for param in model.parameters():
        if param.requires_grad and id(param) not in backbone_ids:
            groups.setdefault((False, 1.0), []).append(param)
    param_groups = [
        {"params": params, "lr": lr * scale, "is_backbone": is_backbone}
        for (is_backbone, scale), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


LR_SCHEDULES = ("poly", "cosine")


def lr_factor(
    iteration: int,
    max_iter: int,
    warmup_iters: tuple[int, int],
    power: float,
    is_backbone: bool,
    schedule: str = "poly",
) -> float:
    """Multiplier of a group's base lr at `iteration` (0-based, before that optimizer step):
    the two-stage linear warm-up, then the poly or cosine decay to 0 at `max_iter`."""
    new_warmup, backbone_warmup = warmup_iters
    if is_backbone:
        if iteration < new_warmup:
            return 0.0
        start, warmup = new_warmup, backbone_warmup
    else:
        start, warmup = 0, new_warmup
    if iteration < start + warmup:
        return (iteration - start) / warmup
    progress = min((iteration - start - warmup) / max(1, max_iter - start - warmup), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** power


def build_lr_scheduler(
    optimizer, max_iter: int, warmup_iters, power: float, schedule: str = "poly"
) -> LambdaLR:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"solver.lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    warmup_iters = tuple(warmup_iters)
    return LambdaLR(
        optimizer,
        [
            lambda it, b=group["is_backbone"]: lr_factor(
                it, max_iter, warmup_iters, power, b, schedule
            )
            for group in optimizer.param_groups
        ],
    )
