"""The stage-two training recipe, top-down: inputs, model, optimisation loop, checkpoints.

Run it as ``python cli.py train`` (one process) or ``torchrun --nproc_per_node N cli.py train``
(data parallel). The global batch (``train.batch_size``) is the same whatever the number of
processes: each process takes an equal share of it per optimizer step, in forward passes of at
most ``train.micro_batch`` videos (:func:`share_batch`), and every random draw is keyed by (seed,
epoch, step, micro-batch), so one process with gradient accumulation and N processes compute the
same update wherever the micro-batches come out the same. A global batch that N processes cannot
share equally is raised to the next multiple of N, and a micro-batch that does not divide a
process's share is lowered; each change is printed in one line before anything starts.

A run directory holds ``config.json`` (the resolved config), ``log.jsonl`` (one JSON object per
step, epoch and evaluation), ``last.pt`` (written after every epoch) and ``best.pt`` (the
checkpoint with the best average mAP so far).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import losa_distributed as distributed
from losa_tal import input_error, write_output
from store import locks
from store.errors import storage_errors
from training import checkpoint as ckpt
from training.config import Config
from training.data import (EpochBatches, StoreDataset, batch_to, channel_statistics,
                           head_classes, needed_layers, training_loader)
from training.detector import Detector, parameter_groups, trainable_parameters
from training.inputs import input_record, open_annotations, open_store, resolve_subset

# Paths may move between a run and its resumption, and so may what changes no step's videos
# (workers, cache, the micro-batch cap, which another process count may lower anyway, the
# timeout); nothing else in the config may change.
RESUME_FREE_KEYS = {"description", "data.store", "data.annotations", "data.num_workers",
                    "data.cache", "train.micro_batch", "train.timeout_minutes"}


def train(config: Config, store_path=None, annotations_path=None, out_dir="runs/train",
          resume: bool = False, progress: bool = True, storage_options=None,
          cpu_threads: int | None = None, tensorboard: bool = True) -> dict:
    """Train a detector; returns the final log record (epoch, step, best mAP, run directory).
    ``storage_options`` (for a URL store) are used, never saved: they may hold credentials.
    ``cpu_threads``: torch threads when training on the CPU (None: leave torch's setting).
    ``tensorboard``: event files beside log.jsonl where the package is installed."""
    from training import tensorboard as events

    place = distributed.launch()
    share = share_batch(config.train, place.world_size)
    config = replace(config, train=replace(config.train, batch_size=share.batch_size))
    device = distributed.rank_device(prefer_cuda=True)
    threads = torch.get_num_threads()  # restored at the end: the caller's process setting
    if cpu_threads is not None and device.type == "cpu":
        torch.set_num_threads(cpu_threads)
    if place.is_main:
        for note in share.notes:
            print(note, file=sys.stderr)
    # Before anything slow: a rank without CUDA among CUDA ranks is refused now.
    distributed.agree_on_device(device, config.train.timeout_minutes)
    try:
        with exclusive_run_directory(Path(out_dir), place):
            trainer = Trainer(device, share, config, store_path, annotations_path, out_dir,
                              resume, progress, storage_options)
            if tensorboard and place.is_main and events.available():
                trainer.events = events.EventLog(out_dir, trainer.model, trainer.layers)
            try:
                return trainer.run()
            finally:
                if trainer.events is not None:
                    trainer.events.close()
    finally:
        torch.set_num_threads(threads)
        distributed.leave()


@dataclass(frozen=True)
class BatchShare:
    """How a global batch is shared by the processes."""

    batch_size: int  # the global batch: train.batch_size, raised where it cannot be shared
    micro_batch: int  # videos per forward pass on each process
    accum_steps: int  # forward passes per optimizer step on each process
    notes: tuple = ()  # what differs from the recipe, one line each

    @property
    def per_process(self) -> int:
        return self.micro_batch * self.accum_steps


def share_batch(train_config, world_size: int) -> BatchShare:
    """Each process's share of the global batch, and the forward passes it takes in: the
    largest micro-batch up to ``train.micro_batch`` that divides the share, so that the
    micro-batches (and with them every random draw) are those of one process wherever
    ``train.micro_batch`` divides the share."""
    batch, cap, notes = train_config.batch_size, train_config.micro_batch, []
    if batch % world_size:
        raised = -(-batch // world_size) * world_size
        notes.append(f"train.batch_size {batch} -> {raised}: {world_size} processes take an "
                     "equal share of the global batch (learning rates unchanged; set "
                     f"train.batch_size to a multiple of {world_size} to choose)")
        batch = raised
    share = batch // world_size
    micro = max(size for size in range(1, min(cap, share) + 1) if share % size == 0)
    if micro != cap:
        notes.append(f"train.micro_batch {cap} -> {micro}: each of {world_size} processes "
                     f"takes {share} videos per step (set train.micro_batch to a divisor of "
                     f"{share} to choose)")
    return BatchShare(batch, micro, share // micro, tuple(notes))


RUN_LOCK = "run.lock"


@contextlib.contextmanager
def exclusive_run_directory(out_dir: Path, place):
    """Hold the run directory for one run: two runs on one --out would interleave log.jsonl
    and overwrite each other's checkpoints. The main process holds an flock, which the kernel
    drops however the process ends, so a killed run never blocks its --resume. ``place``: this
    process's ``losa_distributed.Launch``."""
    if not place.is_main:
        yield
        return
    created = not out_dir.exists()
    with storage_errors(out_dir, "cannot write the run directory"):
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = locks.acquire(str(out_dir / RUN_LOCK))
        except OSError as err:
            if err.errno not in locks.NO_LOCKS:
                raise
            warnings.warn(f"{out_dir}: file locks are refused here ({os.strerror(err.errno)}); "
                          "nothing stops a second run on the same `out_dir`", stacklevel=3)
            lock = False
    if lock is None:
        raise input_error(out_dir, "another training run is writing to it right now; wait for "
                          "it to end, or choose another `out_dir`")
    try:
        yield
    finally:
        if lock is not False:
            locks.release(lock, remove_path=str(out_dir / RUN_LOCK))
        if created:
            with contextlib.suppress(OSError):  # only if empty: refused before writing anything
                out_dir.rmdir()


class Trainer:
    events = None  # a tensorboard.EventLog, fed every record log.jsonl gets

    def __init__(self, device, share, config, store_path, annotations_path, out_dir, resume,
                 progress, storage_options=None):
        place = distributed.launch()
        # Not in the process group yet: the slow start-up below (the store, the cache) waits
        # for no other rank, so no collective can time out meanwhile.
        self.world = distributed.World(rank=place.rank, size=place.world_size, device=device)
        self.config, self.share = config, share
        self.out_dir = Path(out_dir)
        self.progress = progress and place.is_main

        store_path = store_path or config.data.store
        annotations_path = annotations_path or config.data.annotations
        self.store = open_store(store_path, config.data.dataset, storage_options)
        self.annotations = open_annotations(annotations_path)
        # What the run was trained on, for infer --run (and detect) to read the same files.
        self.inputs = {"store": input_record(store_path),
                       "annotations": input_record(annotations_path)}
        self.classes = head_classes(self.annotations, config.data)
        self.layers = needed_layers(config, self.store)
        self.train_set = self._dataset(config.data.train_subset, train=True)
        self.eval_set = self._dataset(config.eval.subset, train=False,
                                      max_videos=config.eval.max_videos)
        if not any(len(t.segments) for t in self.eval_set.truth.values()):
            raise input_error(self.annotations.name, f"the '{self.eval_set.subset}' videos the "
                              "store holds have no ground-truth segments to evaluate against "
                              "(eval.subset, eval.max_videos)")
        self.steps_per_epoch = self._steps_per_epoch()
        self.cache_plan = self._cache_training_split()
        self.loader, self.epoch_batches = None, EpochBatches()
        statistics = self._channel_statistics() if config.data.standardise else None

        self.world = distributed.start(device, config.train.timeout_minutes)
        torch.manual_seed(config.train.seed)
        self.model = Detector(self.store.feature_dim, len(self.classes), len(self.layers),
                              self.store.num_tokens, config.model, config.head,
                              standardise=config.data.standardise)
        if statistics is not None:  # before the EMA copy
            self.model.set_standardisation(**statistics)
        self.model.to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.optim.lr_adapter, config.optim.lr_head,
                             config.optim.weight_decay), fused=self._fused_adamw())
        self.epoch, self.step, self.best = 0, 0, None
        self._prepare_run_dir(resume)
        self.parallel = self.model
        if self.world.size > 1:
            self.parallel = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- inputs --------------------------------------------------------------------------------

    def _dataset(self, subset, train, max_videos=None):
        name = resolve_subset(self.annotations, subset, train)
        return StoreDataset(self.store, self.annotations, name, self.classes, self.layers,
                            self.config.data, train=train, seed=self.config.train.seed,
                            max_videos=max_videos)

    def _steps_per_epoch(self):
        batch = self.share.batch_size
        steps = len(self.train_set) // batch
        if steps == 0:
            raise input_error(self.store.path, f"only {len(self.train_set)} training videos, "
                              f"fewer than train.batch_size {batch}")
        return steps

    def _cache_training_split(self):
        """Copy the training split into memory when it fits (``data.cache``, training/cache.py)."""
        from training.cache import build_cache, plan_cache, split_bytes

        plan = plan_cache(self.config.data.cache, split_bytes(
            self.store, self.train_set.videos, self.layers), self.world.device)
        if self.progress:
            print(plan.message(), file=sys.stderr)
        self.train_set.cache = build_cache(self.store, self.train_set.videos, self.layers,
                                           plan.kind, self.world.device,
                                           self.config.train.timeout_minutes)
        return plan

    def _channel_statistics(self):
        """Per-channel statistics of the training videos, from the cache when there is one."""
        from training.cache import CachedReads

        cache = self.train_set.cache
        source = self.store if cache is None else CachedReads(self.store, cache, self.layers)
        return channel_statistics(source, self.train_set.videos, self.layers)

    def _loader(self, epoch):
        """This process's micro-batches of one epoch, in step order (the last partial batch is
        dropped so that every step has the full global batch).

        One DataLoader serves the whole run, so its workers persist; the epoch travels in the
        sample keys.
        """
        share = self.share
        order = np.random.default_rng([self.config.train.seed, epoch]).permutation(
            len(self.train_set))
        per_step = order[: self.steps_per_epoch * share.batch_size].reshape(
            self.steps_per_epoch, self.world.size, share.per_process)
        self.epoch_batches.batches = [[(epoch, int(i)) for i in keys] for keys in
                                      per_step[:, self.world.rank].reshape(-1, share.micro_batch)]
        if self.loader is None:
            self.loader = training_loader(self.train_set, self.epoch_batches, self.world.device,
                                          self.cache_plan.kind)
        return self.loader

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> dict:
        print(distributed.device_line(self.world.device, "training"), file=sys.stderr)
        self._log({"event": "start", "world_size": self.world.size, "device": str(self.world.device),
                   "micro_batch": self.share.micro_batch, "accum_steps": self.share.accum_steps,
                   "train_videos": len(self.train_set), "eval_videos": len(self.eval_set.videos),
                   "steps_per_epoch": self.steps_per_epoch, "cache": self.cache_plan.message(),
                   "trainable_parameters": trainable_parameters(self.model),
                   "torch_threads": torch.get_num_threads(),
                   "inputs": self.inputs})
        try:
            self._run_epochs()
        finally:
            self.loader = None  # shuts its persistent workers down
        return {"epoch": self.epoch, "step": self.step, "best": self.best,
                "run_dir": str(self.out_dir)}

    def _run_epochs(self):
        config = self.config
        while self.epoch < config.train.epochs:
            loss = self._train_epoch(self.epoch)
            self.epoch += 1
            record = {"event": "epoch", "epoch": self.epoch, "step": self.step, "loss": loss}
            # Saved before it is evaluated: no evaluation failure can lose a finished epoch.
            self._save_checkpoints(improved=False)
            average_map = self._evaluate() if self._evaluation_due() else None
            if average_map is not None:
                record["average_map"] = average_map
                if self.best is None or average_map > self.best["average_map"]:
                    self.best = {"epoch": self.epoch, "average_map": average_map}
                    self._save_checkpoints(improved=True)
            self._log(record)

    def _train_epoch(self, epoch) -> float:
        from tqdm import tqdm

        self.parallel.train()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.config.train.epochs}",
                   unit="step", disable=not self.progress, dynamic_ncols=True)
        losses, started = [], time.perf_counter()
        micro_batches = iter(self._loader(epoch))
        for step_in_epoch in range(self.steps_per_epoch):
            group = [next(micro_batches) for _ in range(self.share.accum_steps)]
            loss = self._optimizer_step(epoch, step_in_epoch, group)
            losses.append(loss)
            videos_per_s = (step_in_epoch + 1) * self.config.train.batch_size / (
                time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss:.4f}", videos_per_s=f"{videos_per_s:.1f}", refresh=False)
            bar.update()
            self._log({"event": "step", "epoch": epoch + 1, "step": self.step, "loss": loss,
                       "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups}})
        bar.close()
        return float(np.mean(losses))

    def _optimizer_step(self, epoch, step_in_epoch, micro_batches) -> float:
        """One update from this process's micro-batches; returns the global batch's loss.

        The objective is the sum of the micro-batch losses of the whole global batch, as if it
        had gone through in one forward pass. DDP averages gradients over processes, hence the
        factor ``world.size``.
        """
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, group["base_lr"], self._warmup_steps(),
                                        self._total_steps(), config.optim.min_lr)
        if config.train.normalizer_update == "before":  # ActionFormer: this step's count first
            self.model.update_loss_normalizer(self._global_positives(micro_batches))
        # Loss and positive points, summed on the device: the step's one host sync is below.
        totals = torch.zeros(2, dtype=torch.float64, device=self.world.device)
        for k, batch in enumerate(micro_batches):
            micro_index = self.world.rank * self.share.accum_steps + k
            # Dropout masks depend on the micro-batch's place in the run, not on the process.
            torch.manual_seed(derived_seed(config.train.seed, epoch, step_in_epoch, micro_index))
            batch = batch_to(batch, self.world.device, self._low_precision())
            last_one = k == len(micro_batches) - 1
            no_sync = self.world.size > 1 and not last_one
            with self.parallel.no_sync() if no_sync else contextlib.nullcontext():
                with self._autocast():
                    losses = self.model.loss(self.parallel(batch), batch)
                (losses["total"] * self.world.size).backward()
            totals += torch.stack([losses["total"].detach().double(),
                                   losses["num_positives"].double()])
        # Every process sees the same global totals, so all of them stop together on a bad loss.
        totals = distributed.sum_across(self.world, totals)
        loss = totals[0].item()  # the step's one host sync
        if not math.isfinite(loss):
            videos = [s["video"] for batch in micro_batches for s in batch["samples"]]
            raise input_error(self.store.path, f"non-finite loss at epoch {epoch + 1} in the "
                              f"step with videos {videos}; check these features (store verify) "
                              "or lower the learning rate")
        if config.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if config.train.normalizer_update == "after":
            self.model.update_loss_normalizer(totals[1])
        update_ema(self.ema, self.model, config.optim.ema_decay)
        self.step += 1
        return loss

    def _global_positives(self, micro_batches) -> torch.Tensor:
        """Positive points of the whole global batch, known from the targets alone; counted
        and left on the device, so that the step keeps its one host sync."""
        device = self.world.device
        count = sum(self.model.count_positives(
            {"mask": batch["mask"].to(device, non_blocking=True), "targets": batch["targets"]})
            for batch in micro_batches)
        return distributed.sum_across(self.world, count.double())

    def _fused_adamw(self) -> bool:
        """One kernel for the whole update on CUDA; CPU keeps the reference implementation."""
        return self.world.device.type == "cuda"

    def _low_precision(self) -> bool:
        return self.config.train.amp and self.world.device.type == "cuda"

    def _autocast(self):
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16,
                              enabled=self._low_precision())

    def _warmup_steps(self):
        return round(self.config.optim.warmup_epochs * self.steps_per_epoch)

    def _total_steps(self):
        return self.config.train.epochs * self.steps_per_epoch

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluation_due(self) -> bool:
        every = self.config.eval.every
        return self.epoch == self.config.train.epochs or (every > 0 and self.epoch % every == 0)

    def _evaluate(self) -> float | None:
        """Average mAP of the EMA weights on the held-out videos, or None when the evaluation
        failed (out of memory, say): one line says so and training goes on, its epoch saved.

        Each process predicts its share of the videos and every process receives all the
        detections, then scores them itself: every process keeps the same "best" record, and
        none waits idle in a collective while another evaluates the whole split.
        """
        try:
            return self._evaluation()
        except Exception as error:  # noqa: BLE001 - any failure: the run keeps what it has
            text = str(error).strip()
            reason = f"{type(error).__name__}: {text.splitlines()[0]}" if text else \
                type(error).__name__
            self._log({"event": "eval_failed", "epoch": self.epoch, "error": reason})
            warnings.warn(f"epoch {self.epoch}: evaluation failed ({reason}); the epoch is kept "
                          f"in {self.out_dir / 'last.pt'}", stacklevel=2)
            return None

    def _evaluation(self) -> float:
        from training.infer import evaluate_predictions, predict

        predictions = predict(self.ema, self.eval_set, self.config.postprocess, self.world.device,
                              self.classes, amp=self.config.train.amp, progress=self.progress,
                              world=self.world)
        report = evaluate_predictions(self.annotations, predictions, self.eval_set,
                                      self.config.eval)
        self._log({"event": "eval", "epoch": self.epoch, "step": self.step,
                   "subset": report["subset"],
                   "average_map": report["average_mAP"], "map": dict(zip(
                       [f"{t:.2f}" for t in report["tiou_thresholds"]], report["mAP"]))})
        return report["average_mAP"]

    # -- run directory and checkpoints -------------------------------------------------------------

    def _prepare_run_dir(self, resume):
        last = self.out_dir / "last.pt"
        state = ckpt.load(last) if resume and last.exists() else None
        self._check_ranks_agree(last.exists(), state)
        if last.exists() and not resume:
            raise input_error(self.out_dir, "already holds a training run (last.pt); pass "
                              "`resume` to continue it, or choose another `out_dir`")
        if state is not None:
            self._restore(state, last)
        elif resume:
            warnings.warn(f"{self.out_dir}: no checkpoint to resume from; starting afresh",
                          stacklevel=2)
        if self.world.is_main:
            with storage_errors(self.out_dir, "cannot write the run directory"):
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_output(self.out_dir / "config.json",
                             json.dumps(self.config.to_dict(), indent=2))
        distributed.barrier(self.world)

    def _check_ranks_agree(self, found: bool, state):
        """Every rank sees the same run directory (one file system shared by all nodes), or all
        refuse alike: no rank may start afresh, or at another epoch, while the others resume."""
        seen = [found, None if state is None else [state["epoch"], state["step"]]]
        views = distributed.gather_json(self.world, seen)
        if any(view != views[0] for view in views):
            shown = "; ".join(f"rank {rank}: " + ("no last.pt" if not view[0] else
                                                 "last.pt" if view[1] is None else
                                                 f"last.pt at epoch {view[1][0]}")
                              for rank, view in enumerate(views))
            raise input_error(self.out_dir, f"the ranks see different runs in it ({shown}); "
                              "give `out_dir` on a file system every node shares")

    def _restore(self, state, path):
        differing = config_differences(Config.from_dict(state["config"], str(path)), self.config)
        if differing:
            raise input_error(path, f"was trained with different settings ({', '.join(differing)});"
                              " resume with the run's own config.json, or choose another `out_dir`")
        if state["classes"] != self.classes:
            raise input_error(self.annotations.name, f"its classes differ from those {path} was "
                              "trained on")
        if state["epoch"] > self.config.train.epochs:
            raise input_error(path, f"is at epoch {state['epoch']}, beyond the run's "
                              f"train.epochs {self.config.train.epochs}")
        ckpt.check_store_matches(state["store"], self.store, path)
        ckpt.load_into(self.model, state["model"], path, "model")
        ckpt.load_into(self.ema, state["ema"], path, "ema")
        ckpt.load_into(self.optimizer, state["optimizer"], path, "optimizer")
        for group in self.optimizer.param_groups:  # the saved flag is the saving device's
            group["fused"] = self._fused_adamw()
        self.epoch, self.step, self.best = state["epoch"], state["step"], state.get("best")
        best_path = path.with_name("best.pt")
        if best_path.exists():  # newer than last.pt's record after a crash between the two
            self.best = ckpt.load(best_path).get("best") or self.best
        self._log({"event": "resume", "epoch": self.epoch, "step": self.step})

    def _save_checkpoints(self, improved: bool):
        if self.world.is_main:
            state = {
                "epoch": self.epoch, "step": self.step,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": {"step": self.step},
                "config": self.config.to_dict(), "classes": self.classes,
                "store": ckpt.store_signature(self.store, self.layers), "best": self.best,
                "inputs": self.inputs,
            }
            # best.pt first: a crash in between leaves last.pt without this best record,
            # which _restore then takes from best.pt.
            if improved:
                ckpt.save(self.out_dir / "best.pt", state)
            ckpt.save(self.out_dir / "last.pt", state)
        distributed.barrier(self.world)

    def _log(self, record: dict):
        if self.world.is_main:
            with storage_errors(self.out_dir / "log.jsonl", "cannot write the log"):
                self.out_dir.mkdir(parents=True, exist_ok=True)
                with open(self.out_dir / "log.jsonl", "a") as log:
                    log.write(json.dumps({**record, "time": time.time()}) + "\n")
            if self.events is not None:
                self.events.write(record)


# ---------------------------------------------------------------------------------------------
# Small pure pieces of the recipe.

def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float) -> float:
    """ActionFormer's per-iteration schedule (its LinearWarmupCosineAnnealingLR): step 0 at lr 0,
    a linear warmup of slope base_lr / (warmup_steps - 1) reaching base_lr at warmup_steps - 1,
    then a cosine from base_lr at warmup_steps down to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied.

    One multi-tensor kernel per list rather than one launch per tensor (hundreds on CUDA).
    """
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))


def default_cpu_threads() -> int:
    """Torch threads per training process on a CPU: half the cores this process may use, shared
    by the node's torchrun processes, at least one. Torch's default (every core) spin-waits on a
    busy machine: one demo-config epoch took 47-125 s with two threads on a loaded 2-core
    machine against 9.2 s with one."""
    return max(1, len(os.sched_getaffinity(0)) // (2 * distributed.launch().local_world_size))


def derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def config_differences(saved: Config, current: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (paths excepted)."""
    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    saved_items, current_items = dict(flatten(saved.to_dict())), dict(flatten(current.to_dict()))
    return [key for key in current_items
            if key not in RESUME_FREE_KEYS and saved_items.get(key) != current_items[key]]
