"""The training loop: one optimizer step per iteration, on a global batch of `solver.batch_size`
images made of `batch_size_per_device` images per process and gradient accumulation.

A video model (VidEoMT) trains on clips the same way: a batch item is a clip (T, 3, H, W) and
its target holds tracks (masks (N, T, H, W)); the criterion tells them apart by shape, and the
evaluation by the task (`Task.video`: an evaluation item is a whole video).

A step gives the same update whichever way its batch is split into processes and accumulation
steps: every micro-batch draws its random numbers (point sampling, masked-attention dropping)
from a seed of its own place in the data stream, and the mask losses of all micro-batches are
normalised by the step's mean number of target masks. A run therefore resumes exactly, with any
number of processes, from nothing but the model, optimizer, schedule and iteration.

BatchNorm (PMT's taps, the dense heads) is the exception: its statistics cover one micro-batch
of every process (synchronised over processes as the authors do), so with accumulation they
cover fewer images than the step; the run says so at its start.
"""

import json
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from eomt import distributed as dist
from eomt.config import ConfigError
from eomt.data.build import build_dataset, build_test_loader, build_train_loader
from eomt.engine.annealing import MaskAnnealing
from eomt.engine.checkpoint import (
    checkpoint_iteration,
    checkpoint_path,
    checkpoints_newest_first,
    remove_partial_checkpoints,
    save_training_state,
)
from eomt.engine.solver import build_lr_scheduler, build_optimizer
from eomt.inference import amp_on, autocast_for
from eomt.modeling import build_backbone, build_criterion, build_model, count_trainable
from eomt.modeling.batch_norm import sync_batch_norms
from eomt.modeling.criterion import count_masks
from eomt.tasks import get_task, summary_line
from eomt.tasks.evaluate import evaluate
from eomt.weights import (
    describe_mismatch,
    holds_decoder_only,
    key_group,
    load_state,
    load_weights,
    with_encoder,
)
from eomt.weights.files import read_checkpoint

RANDOM_WEIGHTS = "random"  # model.weights: no checkpoint, on purpose
# Written last by a run that ended: training reached its final iteration and the final
# evaluation is in results.json (or an --eval-only run's evaluation is); removed when one starts.
FINISHED = "finished.json"
EVALUATIONS = "evaluations"  # the periodic evaluations' results, one file per iteration


def fit_num_classes(cfg, dataset) -> None:
    """model.num_classes 0 becomes the dataset's number of classes; any other must equal it."""
    count = len(dataset.categories)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = count
    elif cfg.model.num_classes != count:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} does not fit the dataset: "
            f"{dataset.categories_source} has {count} classes (set model.num_classes={count}, "
            "or 0 for the dataset's)"
        )


def check_video_task(cfg) -> None:
    """A video model (model.name videomt) with a video task (vis), an image model with an
    image task: the loop feeds what the task's items are."""
    video_model, video_task = cfg.model.name == "videomt", get_task(cfg.task).video
    if video_model != video_task:
        raise ConfigError(
            f"task {cfg.task} is a {'video' if video_task else 'image'} task but model.name "
            f"{cfg.model.name} is {'a video' if video_model else 'an image'} model "
            "(video tasks: vis, vps, vss, with model.name videomt)"
        )
    mixed = [name for name in cfg.test.metrics if get_task(name).video != video_task]
    if mixed:
        raise ConfigError(
            f"test.metrics {mixed}: {'image' if video_task else 'video'} metrics for the "
            f"{'video' if video_task else 'image'} task {cfg.task}"
        )


def check_same_classes(train_set, test_set) -> None:
    """Training and evaluation splits with the same classes, in the same order."""
    train, test = (
        [(c["id"], c["name"], bool(c["isthing"])) for c in dataset.categories]
        for dataset in (train_set, test_set)
    )
    if train == test:
        return
    differ = next(
        (f"label {i} is {a} against {b}" for i, (a, b) in enumerate(zip(train, test)) if a != b),
        f"{len(train)} classes against {len(test)}",
    )
    raise ValueError(
        f"the training split's classes ({train_set.categories_source}) differ from the "
        f"evaluation split's ({test_set.categories_source}): {differ} (id, name, is thing)"
    )


def accumulation_steps(cfg, world: int) -> int:
    per_step = cfg.solver.batch_size_per_device * world
    if cfg.solver.batch_size % per_step:
        raise ValueError(
            f"solver.batch_size={cfg.solver.batch_size} is not a multiple of "
            f"solver.batch_size_per_device={cfg.solver.batch_size_per_device} x {world} processes"
        )
    return cfg.solver.batch_size // per_step


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device = dist.device()
        self.output_dir = Path(cfg.output_dir)
        self.iteration = 0
        self.skipped_steps = 0  # with solver.nonfinite_loss=skip
        self.resumed = False
        self.resumed_from: Path | None = None
        self._tensorboard = None  # logging.tensorboard: the SummaryWriter of train()
        # The evaluation split is read first: it names the classes (model.num_classes 0), and
        # a model that cannot be scored on it stops here, not after training.
        self.test_set = build_dataset(cfg, train=False)
        fit_num_classes(cfg, self.test_set)
        check_video_task(cfg)
        torch.manual_seed(cfg.seed)
        weights = cfg.model.weights
        from_file = weights not in ("", RANDOM_WEIGHTS)
        # A full checkpoint to come replaces the backbone's pretrained weights.
        self.model = build_model(cfg, backbone_weights=not from_file).to(self.device)
        if from_file:
            self._load_weights(weights, cfg.model.weights_strict)
        self.criterion = build_criterion(cfg).to(self.device)
        s = cfg.solver
        self.optimizer = build_optimizer(self.model, s.lr, s.weight_decay, s.llrd)
        self.scheduler = build_lr_scheduler(
            self.optimizer, s.max_iter, s.warmup_iters, s.poly_power, s.lr_schedule
        )
        # Dense heads have no masked attention to anneal, whatever model.masked_attn says.
        anneals = getattr(self.model, "masked_attn", None) == "anneal"
        self.annealing = (
            MaskAnnealing.from_cfg(cfg, self.model.num_query_blocks) if anneals else None
        )
        self.amp = amp_on(self.device, s.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.categories = self.test_set.categories  # saved with the weights

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "skipped_steps": self.skipped_steps,
            "cfg": OmegaConf.to_container(self.cfg),
            "categories": self.categories,
        }

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        missing = [
            key for key in ("model", "optimizer", "scheduler", "iteration") if key not in state
        ]
        if missing:
            raise ValueError(f"{source}: not a training checkpoint (no {', '.join(missing)})")
        load_state(self.model, state["model"], strict=True, source=source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as error:
            raise ValueError(
                f"{source}: its optimizer state does not fit this run's parameter groups "
                f"({error}); was the model or solver config changed?"
            ) from error
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def _load_weights(self, path: str, strict: bool) -> None:
        """model.weights: all of it, or with weights_strict false what matches, said so; a file
        that shares none of the backbone's blocks with the model is not its checkpoint. PMT's
        decoder-only files (the authors' release) take the encoder's pretrained weights, from
        model.backbone_weights or the hub (model.pretrained), as the authors' code does."""
        state = load_weights(path, backbone=self.model.backbone)
        if holds_decoder_only(state):
            m = self.cfg.model
            if not (m.backbone_weights or m.pretrained):
                raise ConfigError(
                    f"model.weights {path}: holds PMT's decoder only; its encoder's pretrained "
                    "weights come from model.backbone_weights=FILE or model.pretrained=true, "
                    "and both are off"
                )
            encoder = build_backbone(self.cfg).state_dict()
            state = with_encoder(state, encoder, self.model.backbone)
        report = load_state(self.model, state, strict, str(path))
        if strict:
            return
        own = self.model.state_dict()
        kept = set(report["missing"]) | set(report["wrong_shape"])
        loaded = [key for key in own if key not in kept]
        mismatch = describe_mismatch(report)
        if not any(key_group(key) == "backbone.blocks" for key in loaded):
            raise ValueError(
                f"model.weights {path}: none of the backbone's blocks match this model "
                f"(model.backbone {self.cfg.model.backbone}); only {len(loaded)} of {len(own)} "
                f"tensors would load, so it is not a checkpoint of this architecture:\n{mismatch}"
            )
        if dist.is_main():
            new = f"; kept their initialisation (model.weights_strict false):\n{mismatch}"
            print(
                f"model.weights {path}: loaded {len(loaded)} of {len(own)} tensors"
                + (new if kept else ""),
                flush=True,
            )

    def resume(self) -> bool:
        """Continue from the newest checkpoint in the output dir that reads back whole; False
        when there is none. Checkpoints are written atomically, so a killed run leaves at most
        a temporary file, which is removed; a damaged file (e.g. a disk fault) is reported and
        the one before it is used. If none can be read, it stops: starting again from iteration
        0 over them is for the user to choose."""
        if dist.is_main():
            remove_partial_checkpoints(self.output_dir)
        problems = []
        for path in checkpoints_newest_first(self.output_dir):
            try:
                state = read_checkpoint(path)
            except ValueError as error:
                warnings.warn(f"skipping a checkpoint that cannot be read: {error}", stacklevel=2)
                problems.append(str(error))
                continue
            self.load_state_dict(state, str(path))
            self.resumed, self.resumed_from = True, path
            if dist.is_main():
                print(f"resumed from {path} at iteration {self.iteration}")
            return True
        if problems:
            raise ValueError(
                f"cannot resume: no checkpoint in {self.output_dir} can be read:\n  "
                + "\n  ".join(problems)
                + "\nMove them away, or choose another output_dir, to start from iteration 0."
            )
        if dist.is_main():
            print(f"no checkpoint in {self.output_dir} to resume: starting at iteration 0")
        return False

    def eval_only(self, resume: bool = False) -> dict:
        """Evaluate the newest checkpoint of the output dir (`resume`) or model.weights; a
        model that loaded neither is evaluated only when asked for (model.weights random).
        The run's folder gets what a training run's does: config.yaml, the evaluation in
        metrics.jsonl and results.json, and finished.json naming what was evaluated."""
        weights = self.cfg.model.weights
        if resume:
            if not self.resume():
                raise FileNotFoundError(f"no checkpoint in {self.output_dir} to evaluate")
        elif not weights:
            raise ValueError(
                "evaluation needs trained weights: set model.weights=FILE, or resume the last "
                "checkpoint of output_dir (--resume); model.weights=random evaluates the "
                "initialised model on purpose"
            )
        elif weights == RANDOM_WEIGHTS and dist.is_main():
            print(
                "evaluating the initialised model, without trained weights (model.weights=random)"
            )
        iteration = self.iteration if resume else checkpoint_iteration(weights)
        if iteration is not None:  # the evaluation is logged at the checkpoint's iteration
            self.iteration = iteration
        self._start_run()
        evaluated = str(self.resumed_from) if resume else weights
        results = self.test(self.output_dir / "metrics.jsonl", final=True)
        self._finish("evaluate", evaluated, iteration)
        return results

    def save(self) -> None:
        if not dist.is_main():
            return
        path = checkpoint_path(self.output_dir, self.iteration)
        try:
            save_training_state(self.output_dir, self.iteration, self.state_dict())
        except OSError as error:
            previous = checkpoints_newest_first(self.output_dir)
            kept = f"{previous[0].name} is intact" if previous else "there is no earlier one"
            raise OSError(
                error.errno,
                f"could not write the checkpoint of iteration {self.iteration} to {path} "
                f"({error.strerror or error}); {kept}",
            ) from error

    def check_fresh_output_dir(self) -> None:
        """A new run does not write over the checkpoints, config and results of another."""
        existing = checkpoints_newest_first(self.output_dir)
        if existing:
            names = ", ".join(path.name for path in existing[:3])
            raise FileExistsError(
                f"output_dir {self.output_dir} holds the checkpoints of another run ({names}"
                f"{', ...' if len(existing) > 3 else ''}): use --resume to continue it, or "
                "another output_dir"
            )

    def check_output_dir(self) -> None:
        """Before any training: the output dir can be written and holds at least one
        checkpoint (model and AdamW's two moments, about 3x the weights)."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe = self.output_dir / f".write_test_{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise OSError(
                error.errno, f"output_dir {self.output_dir} is not writable: {error}"
            ) from error
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        needed = 3 * weights
        free = shutil.disk_usage(self.output_dir).free
        s = self.cfg.solver
        remaining = math.ceil((s.max_iter - self.iteration) / self.cfg.checkpoint_period)
        if free < needed:
            raise OSError(
                f"output_dir {self.output_dir} has {free / 2**20:.1f} MiB free, one checkpoint "
                f"needs about {needed / 2**20:.1f} MiB"
            )
        if free < needed * remaining:
            warnings.warn(
                f"output_dir {self.output_dir} has {free / 2**30:.2f} GiB free: room for "
                f"{free // needed} of the run's {remaining} checkpoints "
                f"(about {needed / 2**20:.0f} MiB each)",
                stacklevel=2,
            )

    # -- loop ------------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, s = self.cfg, self.cfg.solver
        world = dist.world_size()
        accumulation = accumulation_steps(cfg, world)
        model = self.model
        self._check_batch_norm_statistics(accumulation, world)
        if world > 1:
            sync_batch_norms(self.model)
            # The depthwise convs' weight gradients differ from DDP's buckets only in the stride
            # of a size-1 dimension; the warning it prints for that is noise.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.model, device_ids=device_ids)
        forward = torch.compile(model) if s.compile else model
        if not self.resumed:
            self.check_fresh_output_dir()
        if dist.is_main():
            self.check_output_dir()
        self._start_run()
        train_loader = build_train_loader(cfg, self.iteration, accumulation, dist.rank(), world)
        train_set = train_loader.dataset.dataset
        check_same_classes(train_set, self.test_set)
        self.categories = train_set.categories
        loader = iter(train_loader)
        metrics_file = self.output_dir / "metrics.jsonl"
        if self.resumed and dist.is_main():
            _drop_records_after(metrics_file, self.iteration)
        wandb_run = self._start_wandb() if dist.is_main() else None
        if dist.is_main():
            self._start_tensorboard(metrics_file)
        # An evaluation comes after the checkpoint of its iteration: one that was interrupted,
        # or logged but not known to have finished, is redone (the final one below).
        if self.resumed and self._evaluates_at(self.iteration) and self.iteration < s.max_iter:
            self.test(metrics_file, wandb_run, final=False)
        if dist.is_main():
            trainable, frozen = count_trainable(self.model)
            print(f"parameters: {trainable:,} trainable, {frozen:,} frozen", flush=True)
        progress = tqdm(
            total=s.max_iter,
            initial=self.iteration,
            desc="train",
            disable=not dist.is_main(),
            dynamic_ncols=True,
        )
        model.train()
        # time_per_iter: the mean over the iterations since the last logged record.
        interval_start, interval_iter = time.perf_counter(), self.iteration
        while self.iteration < s.max_iter:
            if self.annealing is not None:
                probs = self.annealing.probs(self.iteration)
                self.model.set_attn_mask_probs(probs)
            losses = self._step(forward, model, loader, accumulation)
            self.iteration += 1
            progress.update(1)
            if self.iteration % cfg.log_period == 0 or self.iteration == s.max_iter:
                record = {
                    "iteration": self.iteration,
                    "lr": max(g["lr"] for g in self.optimizer.param_groups if not g["is_backbone"]),
                    "backbone_lr": max(  # 0 when the backbone is frozen
                        (g["lr"] for g in self.optimizer.param_groups if g["is_backbone"]),
                        default=0.0,
                    ),
                    "time_per_iter": (time.perf_counter() - interval_start)
                    / (self.iteration - interval_iter),
                    **losses,
                }
                if self.annealing is not None:
                    record["attn_mask_probs"] = probs  # those of the step just taken
                if self.skipped_steps:
                    record["skipped_steps"] = self.skipped_steps
                if skipped_samples := dist.sum_over_processes(
                    len(train_loader.skipped), self.device
                ):
                    record["skipped_samples"] = skipped_samples  # since this (re)start
                progress.set_postfix(loss=f"{losses['loss']:.3f}")
                self._log(metrics_file, record, wandb_run)
                interval_start, interval_iter = time.perf_counter(), self.iteration
            if self.iteration % cfg.checkpoint_period == 0 or self.iteration == s.max_iter:
                self.save()
            if self._evaluates_at(self.iteration) and self.iteration < s.max_iter:
                self.test(metrics_file, wandb_run, final=False)
                interval_start = time.perf_counter()  # the evaluation is not training time
        progress.close()
        results = self.test(metrics_file, wandb_run, final=True)
        self._finish("train", checkpoint_path(self.output_dir, self.iteration).name, self.iteration)
        if wandb_run is not None:
            wandb_run.finish()
        self._close_tensorboard()
        return results

    def _check_batch_norm_statistics(self, accumulation: int, world: int) -> None:
        """With accumulation, a model that normalises with batch statistics sees fewer images
        at once than the step holds: said, with the setting that avoids it."""
        uses_batch_norm = any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        )
        if accumulation == 1 or not uses_batch_norm or not dist.is_main():
            return
        s = self.cfg.solver
        warnings.warn(
            f"BatchNorm statistics cover {s.batch_size_per_device} images x {world} "
            f"process(es), not the step's {s.batch_size} (accumulated {accumulation} times): "
            f"solver.batch_size_per_device={s.batch_size // world} makes them the step's, as "
            "the authors' 4 GPUs x 4 images do",
            stacklevel=2,
        )

    def _evaluates_at(self, iteration: int) -> bool:
        period = self.cfg.test.eval_period
        return bool(period) and iteration > 0 and iteration % period == 0

    def _step(self, forward, model, loader, accumulation: int) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        rank, world = dist.rank(), dist.world_size()
        batches = [next(loader) for _ in range(accumulation)]
        num_masks = self._mean_num_masks(batches, accumulation * world)
        totals: dict[str, float] = {}
        for micro, (images, targets) in enumerate(batches):
            # The micro-batch's place among the step's accumulation x world ones, as the
            # samplers lay them out in the data stream.
            slot = (self.iteration * accumulation + micro) * world + rank
            torch.manual_seed(self.cfg.seed * 2**32 + slot)
            # Images (B, 3, H, W), or clips (B, T, 3, H, W) for a video model; uint8 (video
            # frames) as floats in [0, 1], as images come.
            images = torch.stack(images).to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = images.float() / 255
            targets = [
                {"masks": t["masks"].to(self.device), "labels": t["labels"].to(self.device)}
                for t in targets
            ]
            sync = micro == accumulation - 1 or not hasattr(model, "no_sync")
            with nullcontext() if sync else model.no_sync():
                with autocast_for(self.device, self.amp):
                    predictions = forward(images)
                losses = self.criterion(predictions, targets, num_masks)
                self.scaler.scale(losses["loss"] / accumulation).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.item() / accumulation
        # The loss terms of the whole step, logged and checked alike by every process.
        totals = dist.mean_over_processes(totals, self.device)
        if not math.isfinite(totals["loss"]):
            self._nonfinite_loss(totals)
            return totals
        self.scaler.unscale_(self.optimizer)
        if self.cfg.solver.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.solver.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return totals

    def _mean_num_masks(self, batches: list, micro_batches: int) -> float:
        """Target masks per micro-batch of this step, over all processes (at least 1): the
        normaliser of every micro-batch's mask losses, as one batch of the whole step would
        have (Mask2Former normalises by the mean over processes)."""
        count = sum(count_masks(t) for _, targets in batches for t in targets)
        return max(dist.sum_over_processes(count, self.device) / micro_batches, 1.0)

    def _nonfinite_loss(self, totals: dict) -> None:
        """A step whose loss is not finite on some process: stop, or (solver.nonfinite_loss
        skip) leave the parameters as they are and go on, at most solver.max_skipped_steps
        times in the whole run."""
        s = self.cfg.solver
        terms = ", ".join(f"{k}={v:.4g}" for k, v in totals.items())
        where = f"non-finite loss at iteration {self.iteration + 1}: {terms}"  # as logged
        if s.nonfinite_loss == "skip" and self.skipped_steps < s.max_skipped_steps:
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.skipped_steps += 1
            if dist.is_main():
                warnings.warn(
                    f"{where}; step skipped ({self.skipped_steps} of at most "
                    f"{s.max_skipped_steps})",
                    stacklevel=2,
                )
            return
        reason = (
            f"solver.max_skipped_steps={s.max_skipped_steps} steps already skipped"
            if s.nonfinite_loss == "skip"
            else "solver.nonfinite_loss=skip would skip such steps"
        )
        raise FloatingPointError(
            f"{where}; stopped ({reason}); the last checkpoint in {self.output_dir} is intact"
        )

    def _start_run(self) -> None:
        """A run starts: its config is written and it is no longer finished, until it is."""
        if not dist.is_main():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / FINISHED).unlink(missing_ok=True)
        (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))

    def _finish(self, mode: str, evaluated: str, iteration: int | None) -> None:
        """finished.json, written last and atomically: what ended ("train" at its final
        iteration, or "evaluate"), the checkpoint (or weights) its results are of."""
        if not dist.is_main():
            return
        record = {
            "mode": mode,
            "iteration": iteration,
            "checkpoint": evaluated,
            "results": "results.json",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp = self.output_dir / (FINISHED + ".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.output_dir / FINISHED)

    def test(self, metrics_file=None, wandb_run=None, final: bool = True) -> dict:
        """Evaluate the model. The final evaluation writes results.json; a periodic one
        (`final` false) writes evaluations/iteration_NNNNNNN.json, so that results.json only
        ever holds a run's final numbers."""
        cfg = self.cfg
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
            record = {"iteration": self.iteration, **_scalar_metrics(results)}
            if metrics_file is not None:
                self._log(metrics_file, record, wandb_run)
            path = self.output_dir / "results.json"
            if not final:
                path = self.output_dir / EVALUATIONS / f"iteration_{self.iteration:07d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                json.dump(_jsonable(results), f, indent=1)
            print(summary_line(results), flush=True)
        return results

    def _log(self, metrics_file, record: dict, wandb_run) -> None:
        if not dist.is_main():
            return
        if self._tensorboard is not None:
            _write_scalars(self._tensorboard, record)
        # A skipped step's non-finite losses as null: NaN is not JSON.
        record = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()
        }
        with open(metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
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

    def _start_tensorboard(self, metrics_file: Path) -> None:
        """logging.tensorboard: a SummaryWriter into OUTPUT_DIR/tensorboard/ that gets what
        metrics.jsonl gets. Its purge step is the iteration this run starts from, so that what
        an interrupted run wrote from there on is hidden (a fresh run hides all older events);
        the records of that iteration which metrics.jsonl keeps (the training record before
        the checkpoint) are written again."""
        self._close_tensorboard()
        if not self.cfg.logging.tensorboard:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(
            str(self.output_dir / "tensorboard"), purge_step=self.iteration
        )
        if self.iteration > 0 and metrics_file.is_file():
            for line in metrics_file.read_text().splitlines():
                record = json.loads(line) if line else {}
                if record.get("iteration") == self.iteration:
                    _write_scalars(self._tensorboard, record)

    def _close_tensorboard(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _write_scalars(writer, record: dict) -> None:
    """A metrics.jsonl record as TensorBoard scalars at its iteration, under the same names; a
    list (attn_mask_probs) as one scalar per item (attn_mask_probs/0, /1, ...), null as NaN.
    Flushed at once: the curves are live, and an interrupted run loses nothing it logged."""
    for key, value in record.items():
        if key == "iteration":
            continue
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in items:
            if item is None or (isinstance(item, (int, float)) and not isinstance(item, bool)):
                tag = key if index is None else f"{key}/{index}"
                number = math.nan if item is None else float(item)
                writer.add_scalar(tag, number, global_step=record["iteration"])
    writer.flush()


def _drop_records_after(metrics_file: Path, iteration: int) -> None:
    """Forget what the interrupted run logged after its checkpoint of `iteration`: the steps
    after it, and the evaluation at it, which follows the checkpoint. They are redone."""
    if not metrics_file.is_file():
        return
    lines = metrics_file.read_text().splitlines()
    records = [(line, json.loads(line)) for line in lines if line]
    kept = [
        line
        for line, r in records
        if r["iteration"] < iteration or (r["iteration"] == iteration and "lr" in r)
    ]
    tmp = metrics_file.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics_file)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _scalar_metrics(metrics: dict) -> dict:
    """Flat {task/key: float} of the scalar results, for logs."""
    return {
        f"{task}/{key}": float(value)
        for task, results in metrics.items()
        for key, value in results.items()
        if isinstance(value, (int, float))
    }
