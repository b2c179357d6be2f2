"""The training loop: one optimizer step per iteration, on a global batch of `solver.batch_size`
images made of `batch_size_per_device` images per process and gradient accumulation."""

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from eomt.data.build import build_dataset, build_test_loader, build_train_loader
from eomt.engine import distributed as dist
from eomt.engine.annealing import MaskAnnealing
from eomt.engine.checkpoint import (
    last_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_training_state,
)
from eomt.engine.inference import (
    autocast_for,
    evaluate,
    scalar_metrics,
    summary_line,
    write_metrics,
)
from eomt.engine.solver import build_lr_scheduler, build_optimizer
from eomt.modeling import build_model
from eomt.modeling.criterion import MaskClassificationLoss


def accumulation_steps(cfg, world: int) -> int:
    per_step = cfg.solver.batch_size_per_device * world
    if cfg.solver.batch_size % per_step:
        raise ValueError(
            f"solver.batch_size={cfg.solver.batch_size} is not a multiple of "
            f"solver.batch_size_per_device={cfg.solver.batch_size_per_device} x {world} processes"
        )
    return cfg.solver.batch_size // per_step


def build_criterion(cfg) -> MaskClassificationLoss:
    loss = cfg.loss
    return MaskClassificationLoss(
        num_classes=cfg.model.num_classes,
        class_weight=loss.class_weight,
        mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight,
        no_object_weight=loss.no_object_weight,
        num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
    )


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device = dist.device()
        self.output_dir = Path(cfg.output_dir)
        self.iteration = 0
        torch.manual_seed(cfg.seed + dist.rank())
        # A full checkpoint to come replaces the backbone's pretrained weights.
        self.model = build_model(cfg, backbone_weights=not cfg.model.weights).to(self.device)
        if cfg.model.weights:
            report = load_checkpoint(self.model, cfg.model.weights, cfg.model.weights_strict)
            if dist.is_main() and any(report.values()):
                print(f"not loaded from {cfg.model.weights}: {report}")
        self.criterion = build_criterion(cfg).to(self.device)
        s = cfg.solver
        self.optimizer = build_optimizer(self.model, s.lr, s.weight_decay, s.llrd)
        self.scheduler = build_lr_scheduler(
            self.optimizer, s.max_iter, s.warmup_iters, s.poly_power
        )
        self.annealing = MaskAnnealing.from_cfg(cfg) if cfg.model.masked_attn == "anneal" else None
        self.amp = s.amp if self.device.type == "cuda" else "none"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.test_set = None
        self.categories = None  # of the training data, saved with the weights

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "rng": _gather_rng_states(),
            "cfg": OmegaConf.to_container(self.cfg),
            "categories": self.categories,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        if len(state["rng"]) != dist.world_size():
            raise ValueError(
                f"checkpoint of a {len(state['rng'])}-process run cannot resume exactly "
                f"with {dist.world_size()} processes"
            )
        rng = state["rng"][dist.rank()]
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])

    def resume(self) -> bool:
        path = last_checkpoint(self.output_dir)
        if path is None:
            return False
        self.load_state_dict(read_checkpoint(path))
        if dist.is_main():
            _drop_records_after(self.output_dir / "metrics.jsonl", self.iteration)
            print(f"resumed from {path} at iteration {self.iteration}")
        return True

    def save(self) -> None:
        state = self.state_dict()  # every process takes part: it gathers their RNG states
        if dist.is_main():
            save_training_state(self.output_dir, self.iteration, state)

    # -- loop ------------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, s = self.cfg, self.cfg.solver
        world = dist.world_size()
        accumulation = accumulation_steps(cfg, world)
        model = self.model
        if world > 1:
            # The depthwise convs' weight gradients differ from DDP's buckets only in the stride
            # of a size-1 dimension; the warning it prints for that is noise.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.model, device_ids=device_ids)
        forward = torch.compile(model) if s.compile else model
        if dist.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        train_loader = build_train_loader(cfg, self.iteration, accumulation, dist.rank(), world)
        self.categories = train_loader.dataset.dataset.categories
        loader = iter(train_loader)
        metrics_file = self.output_dir / "metrics.jsonl"
        wandb_run = self._start_wandb() if dist.is_main() else None
        progress = tqdm(
            total=s.max_iter,
            initial=self.iteration,
            desc="train",
            disable=not dist.is_main(),
            dynamic_ncols=True,
        )
        model.train()
        start_time, start_iter = time.perf_counter(), self.iteration
        while self.iteration < s.max_iter:
            if self.annealing is not None:
                probs = self.annealing.probs(self.iteration)
                self.model.attn_mask_probs.copy_(torch.tensor(probs))
            losses = self._step(forward, model, loader, accumulation)
            self.iteration += 1
            progress.update(1)
            if self.iteration % cfg.log_period == 0 or self.iteration == s.max_iter:
                record = {
                    "iteration": self.iteration,
                    "lr": max(g["lr"] for g in self.optimizer.param_groups if not g["is_backbone"]),
                    "backbone_lr": max(
                        g["lr"] for g in self.optimizer.param_groups if g["is_backbone"]
                    ),
                    "time_per_iter": (time.perf_counter() - start_time)
                    / (self.iteration - start_iter),
                    **losses,
                }
                if self.annealing is not None:
                    record["attn_mask_probs"] = self.model.attn_mask_probs.tolist()
                progress.set_postfix(loss=f"{losses['loss']:.3f}")
                self._log(metrics_file, record, wandb_run)
            if self.iteration % cfg.checkpoint_period == 0 or self.iteration == s.max_iter:
                self.save()
            if cfg.test.eval_period and self.iteration % cfg.test.eval_period == 0:
                self.test(metrics_file, wandb_run)
        progress.close()
        results = self.test(metrics_file, wandb_run)
        if wandb_run is not None:
            wandb_run.finish()
        return results

    def _step(self, forward, model, loader, accumulation: int) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(accumulation):
            images, targets = next(loader)
            images = torch.stack(images).to(self.device, non_blocking=True)
            targets = [
                {"masks": t["masks"].to(self.device), "labels": t["labels"].to(self.device)}
                for t in targets
            ]
            sync = micro == accumulation - 1 or not hasattr(model, "no_sync")
            with nullcontext() if sync else model.no_sync():
                with autocast_for(self.device, self.amp):
                    predictions = forward(images)
                losses = self.criterion(predictions, targets)
                self.scaler.scale(losses["loss"] / accumulation).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.item() / accumulation
        if not math.isfinite(totals["loss"]):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in totals.items())
            raise FloatingPointError(
                f"non-finite loss at iteration {self.iteration}: {terms}; "
                f"the last checkpoint in {self.output_dir} is intact"
            )
        self.scaler.unscale_(self.optimizer)
        if self.cfg.solver.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.solver.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return totals

    def test(self, metrics_file=None, wandb_run=None) -> dict:
        cfg = self.cfg
        if self.test_set is None:
            self.test_set = build_dataset(cfg, cfg.dataset.test_split, train=False)
        loader = build_test_loader(cfg, self.test_set, dist.rank(), dist.world_size())
        results = evaluate(
            self.model,
            loader,
            cfg,
            self.test_set.categories,
            str(self.output_dir),
            show=dist.is_main(),
        )
        if dist.is_main():
            record = {"iteration": self.iteration, **scalar_metrics(results)}
            if metrics_file is not None:
                self._log(metrics_file, record, wandb_run)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "results.json", "w") as f:
                json.dump(_jsonable(results), f, indent=1)
            print(summary_line(results), flush=True)
        return results

    def _log(self, metrics_file, record: dict, wandb_run) -> None:
        if not dist.is_main():
            return
        write_metrics(metrics_file, record)
        if wandb_run is not None:
            wandb_run.log(
                {k: v for k, v in record.items() if k != "iteration"}, step=record["iteration"]
            )

    def _start_wandb(self):
        if not self.cfg.wandb.enabled:
            return None
        import wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        return wandb.init(
            project=self.cfg.wandb.project,
            name=self.cfg.wandb.name or None,
            config=OmegaConf.to_container(self.cfg),
            dir=str(self.output_dir),
            mode=mode,
        )


def _drop_records_after(metrics_file: Path, iteration: int) -> None:
    """Forget what the interrupted run logged after its last checkpoint: it is redone."""
    if not metrics_file.is_file():
        return
    lines = metrics_file.read_text().splitlines()
    kept = [line for line in lines if line and json.loads(line)["iteration"] <= iteration]
    tmp = metrics_file.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics_file)


def _gather_rng_states() -> list[dict]:
    """The RNG states of all processes, in rank order."""
    state = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if dist.world_size() == 1:
        return [state]
    states = [None] * dist.world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
