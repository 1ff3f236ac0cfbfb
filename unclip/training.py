"""The one training loop: accelerate (1..N processes), EMA, warm-up, clipping, checkpoints, resume, logs.

Each component supplies `loss_fn(model, batch) -> loss` (or `(loss, {name: value})`); this loop owns the
optimizer, data order, mixed precision, checkpoints and progress. Runs unchanged under `accelerate launch`.

Data order is a function of (seed, samples seen): step s consumes global positions [s*G, (s+1)*G) of a
stream of per-epoch permutations, G = batch_size * processes * grad_accum; rank r takes its slice. A resumed
run therefore continues exactly, also with another number of processes (keep G by adjusting batch_size).

Random draws: each batch carries a `SampleRandom` (`sample_random(batch)`) whose draws are made per sample,
seeded by (seed, the sample's global position), so a sample gets the same timestep, noise and condition
dropout however the global batch is split over processes and micro-steps: N processes with per-process
batch B train like one process with batch N*B (equal up to float summation order). Draws that do not go
through it (torch's global RNG) are seeded per (seed, micro-step, rank).

Distributed (accelerate launch): every rank starts from rank 0's initial weights. Under DDP every rank
computes the same EMA from the synchronised whole weights; under FSDP2 (accelerate's config with
`fsdp_version: 2`) each rank averages its own DTensor shards, placed like the model's (`EMA`). Checkpoints
hold whole weights and a whole, name-keyed optimizer state (torch.distributed.checkpoint's full state dicts,
gathered by every rank, written by the main process), so a run resumes on any number of processes and on
either engine. Only the main process writes checkpoints, exports, samples, metrics and logs; the logged loss
is the mean over processes. FSDP1 and DeepSpeed are refused with a ValueError (see docs/SCALING.md).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from .checkpoint import replace_dir
from .config import config_to_dict, write_json
from .precision import resolve_precision


@dataclass
class TrainConfig:
    steps: int = 10_000            # optimizer steps
    batch_size: int = 64           # per process and micro-step
    lr: float = 3e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 200        # linear learning-rate warm-up
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 10% at the last step)
    grad_accum: int = 1            # micro-batches per optimizer step
    grad_clip: float = 1.0         # max global grad norm; 0 disables
    ema_decay: float = 0.999       # with warm-up: min(decay, (1 + step) / (10 + step))
    mixed_precision: str = "auto"  # "auto" (bf16 where native, see unclip.precision) | "no" | "bf16" | "fp16"
    compile: bool = False          # torch.compile the model (pays back its start-up on long runs)
    cpu: bool = False              # force the CPU even where accelerate would pick a GPU
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0          # write a sample grid every K steps (0: only at the end)
    eval_every: int = 0            # run eval_fn every K steps (0: only at the end)
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0           # DataLoader worker processes


class TrainingError(ValueError):
    """Training cannot go on (non-finite loss, disk full); the last good checkpoint is kept."""


# ---------------------------------------------------------------- data order


class StepBatchSampler:
    """Per-rank batches of indices, resumable at any step (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start_sample: int):
        if n < 1:
            raise ValueError("the training data set is empty")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.position = start_sample  # global samples consumed so far
        self._perms: dict[int, torch.Tensor] = {}

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][i])

    def __iter__(self):
        while True:
            start = self.position + self.rank * self.batch_size
            yield [self._index(p) for p in range(start, start + self.batch_size)]
            self.position += self.batch_size * self.world


# ---------------------------------------------------------------- per-sample random draws

RANDOM_KEY = "_random"  # the batch entry the loop fills with a SampleRandom


class SampleRandom:
    """Random draws made per sample: sample i draws from its own generator, seeded by (seed, global position).

    Every call draws `shape` per sample and stacks them: `rand(*shape) -> [B, *shape]`. Drawn on the CPU (the
    same numbers on every device) and moved to `device`.
    """

    def __init__(self, seeds, device="cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    @classmethod
    def at_positions(cls, seed: int, first: int, count: int, device="cpu") -> "SampleRandom":
        """The draws of the samples at global positions [first, first + count) of a run with this seed."""
        return cls([(seed * 2_654_435_761 + p) % 2**32 for p in range(first, first + count)], device)

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, draw, dtype=None) -> torch.Tensor:
        return torch.stack([draw(g) for g in self.generators]).to(self.device, dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        """[B, *shape] uniform in [0, 1)."""
        return self._stack(lambda g: torch.rand(shape, generator=g))

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[B, *shape] standard normal."""
        return self._stack(lambda g: torch.randn(shape, generator=g), dtype)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """[B, *shape] integers in [0, high)."""
        return self._stack(lambda g: torch.randint(0, high, shape, generator=g))


def sample_random(batch: dict, batch_size: int, device) -> SampleRandom:
    """The batch's per-sample random draws (set by the loop); outside the loop, seeds from torch's global RNG."""
    rng = batch.get(RANDOM_KEY)
    if rng is None:
        return SampleRandom(torch.randint(0, 2**32, (batch_size,)).tolist(), device)
    if len(rng) != batch_size:
        raise ValueError(f"the batch has {batch_size} samples but its SampleRandom {len(rng)}")
    return rng


class SkipBad(Dataset):
    """Wraps a dataset: an item that raises ValueError/OSError (corrupt image) becomes None and is counted."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except (ValueError, OSError):
            return None


def collate(items: list) -> dict:
    """Stack a list of sample dicts; None items (corrupt samples) are dropped and counted in `_skipped`."""
    good = [item for item in items if item is not None]
    batch = torch.utils.data.default_collate(good) if good else {}
    batch["_skipped"] = len(items) - len(good)
    return batch


def make_loader(dataset, config: TrainConfig, rank: int, world: int, start_sample: int, collate_fn=collate):
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=collate_fn)
    sampler = StepBatchSampler(len(dataset), config.batch_size, rank, world, config.seed, start_sample)
    return DataLoader(SkipBad(dataset), batch_sampler=sampler, num_workers=config.num_workers,
                      collate_fn=collate_fn, persistent_workers=config.num_workers > 0)


def infinite(loader):
    """Batches forever; a batch whose samples were all unreadable is counted into the next one's `_skipped`."""
    try:
        limit = 2 * len(loader.dataset)  # map-style: this many unreadable samples in a row means all are
    except TypeError:
        limit = None
    carried = 0
    while True:
        empty = True
        for batch in loader:
            if set(batch) <= {"_skipped"}:
                carried += int(batch.get("_skipped", 0))
                if limit is not None and carried >= limit:
                    raise ValueError(f"{carried} training samples in a row could not be read (corrupt images?); "
                                     "check the data")
                continue
            batch["_skipped"] = int(batch.get("_skipped", 0)) + carried
            carried, empty = 0, False
            yield batch
        if empty:  # an empty stream (e.g. a process that got no shards) would otherwise loop forever
            raise ValueError("the training data gave no usable batch in a whole pass (empty data set or shard "
                             "list, or every sample unreadable?)")


def split_heldout(n: int, heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows): at most `heldout` samples and at most a tenth of the data held out."""
    k = min(heldout, n // 10)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[k:].sort().values, order[:k].sort().values


# ---------------------------------------------------------------- EMA, learning rate, checkpoints


@torch.no_grad()
def update_ema(ema_params, params, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param, tensor by tensor (DTensor shards average locally)."""
    for e, p in zip(ema_params, params):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)


class EMA:
    """The exponential moving average of a model's weights, sharded like the prepared model.

    `module` holds whole fp32 weights: what checkpoints, exports and the hooks read. Where the prepared model's
    parameters are plain tensors (one process, DDP) the average is `module`'s own parameters, on the device.
    Where they are FSDP2 DTensor shards, the average is kept as DTensors placed like them on the device, so
    each process updates its own shard, `module` waits in host memory, and `gather()` (a collective: every
    process calls it) writes the whole weights into it.
    """

    def __init__(self, module: torch.nn.Module, prepared: torch.nn.Module):
        self.module = module
        self.params = [distribute_tensor(e.data, p.device_mesh, p.placements) if isinstance(p, DTensor) else e
                       for e, p in zip(module.parameters(), prepared.parameters())]
        self.sharded = any(isinstance(e, DTensor) for e in self.params)
        if self.sharded:
            self.module.to("cpu")

    @torch.no_grad()
    def update(self, prepared: torch.nn.Module, decay: float) -> None:
        update_ema(self.params, prepared.parameters(), decay)
        for e, b in zip(self.module.buffers(), prepared.buffers()):
            e.copy_(b.to(e.device))

    @torch.no_grad()
    def gather(self) -> torch.nn.Module:
        """`module` with the current average (all-gathers the shards under FSDP2)."""
        if self.sharded:
            for e, s in zip(self.module.parameters(), self.params):
                e.copy_(s.full_tensor() if isinstance(s, DTensor) else s)
        return self.module

    @contextlib.contextmanager
    def on(self, device):
        """The (gathered) module on `device` while the hooks run; back in host memory afterwards if sharded."""
        yield self.module.to(device)
        if self.sharded:
            self.module.to("cpu")


def lr_factor(step: int, config: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_schedule == "cosine":
        progress = min(1.0, step / max(1, config.steps))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return warm


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place) sorted by step."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and (path / "training_state.pt").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the CPU of rank 0


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Whole model weights and the whole optimizer state keyed by parameter name, from a plain, DDP or FSDP2
    model (a collective under FSDP2: every process calls it; processes other than rank 0 get empty dicts)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the torch optimizer
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, ema, optimizer_state: dict, samples_seen: int,
                    keep: int) -> Path:
    """Write checkpoints/step-N (whole weights, EMA module, name-keyed optimizer state) atomically."""
    target = Path(run_dir) / "checkpoints" / f"step-{step:08d}"

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        torch.save({"step": step, "samples_seen": samples_seen, "optimizer": optimizer_state},
                   tmp / "training_state.pt")

    try:
        replace_dir(target, fill)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise TrainingError(f"no space left on device while writing {target}; "
                                "the previous checkpoint is kept — free space and --resume") from None
        raise
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, ema) -> dict:
    """Restore whole weights into the unprepared model and EMA module; returns training_state.pt's contents
    (step, samples_seen, optimizer: load it into the prepared optimizer with `load_optimizer_state`)."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    return torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """A name-keyed whole optimizer state (`full_state`) into the prepared model's optimizer, sharded as it is."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if all(isinstance(i, int) for group in state["param_groups"] for i in group["params"]):
        optimizer.load_state_dict(state)  # a checkpoint from before name-keyed states (whole, unsharded weights)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


class MetricsLog:
    """metrics.csv in tidy form: step, samples_seen, name, value (appends across resumes)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        if enabled and not self.path.exists():
            self.path.write_text("step,samples_seen,name,value\n")

    def log(self, step: int, samples_seen: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            for name, value in values.items():
                writer.writerow([step, samples_seen, name, f"{float(value):.6g}"])


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts with typed values."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "samples_seen": int(r["samples_seen"]), "name": r["name"],
                 "value": float(r["value"])} for r in csv.DictReader(f)]


# ---------------------------------------------------------------- the loop


@dataclass
class Hooks:
    """What a component plugs into the loop; every hook gets the EMA model (on the main process only)."""
    export: Callable[[torch.nn.Module, int], None] | None = None        # write the model folder
    sample: Callable[[torch.nn.Module, int], Any] | None = None         # -> PIL image (a grid)
    evaluate: Callable[[torch.nn.Module, int], dict] | None = None      # -> {metric: value}


def train(model: torch.nn.Module, loss_fn: Callable, dataset, run_dir: str | os.PathLike, config: TrainConfig,
          hooks: Hooks | None = None, resume: bool = False, extra_info: dict | None = None,
          collate_fn=collate, progress: bool = True, skipped: int = 0) -> torch.nn.Module:
    """Train `model` with `loss_fn` on `dataset`; returns the EMA model. See the module docstring.

    `skipped`: samples already left out while preparing `dataset` (unreadable images found when encoding it
    up front); counted, with the corrupt samples the loop skips, in metrics.csv's `skipped_samples`.
    """
    hooks = hooks or Hooks()
    run_dir = Path(run_dir)
    # bf16 is plain autocast (no loss scaling), done here: accelerate's process-wide state cannot change its
    # mixed precision once set, which would break a second run in the same process (a notebook, the tests).
    precision = _mixed_precision(config)
    accelerator = Accelerator(mixed_precision="no" if precision == "bf16" else precision, cpu=config.cpu,
                              gradient_accumulation_steps=config.grad_accum)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.batch_size * world * config.grad_accum
    _check_whole_parameters(accelerator)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:  # raised on every rank: a raise on the main process alone would hang the rest
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue, "
                         "or choose another run folder")
    if main:
        scale = {"processes": world, "global_batch": global_batch, "lr": config.lr,
                 "mixed_precision": precision,
                 "distributed_type": str(accelerator.distributed_type.value)}
        _prepare_run_dir(run_dir, config, {**(extra_info or {}), "distributed": scale}, resume, bool(checkpoints))
    accelerator.wait_for_everyone()

    model.to(accelerator.device)
    if world > 1:  # every rank starts from rank 0's weights (DDP broadcasts them itself, FSDP2 does not)
        _broadcast_weights(model)
    ema_module = copy.deepcopy(model).float().requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    step, samples_seen, resumed = 0, 0, None
    if resume and checkpoints:
        resumed = load_checkpoint(checkpoints[-1][1], model, ema_module)
        step, samples_seen = int(resumed["step"]), int(resumed["samples_seen"])
        if main:
            tqdm.write(f"resumed from {checkpoints[-1][1]} (step {step})")
    _check_same_step(accelerator, step, run_dir)
    _check_shardable(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None:
        load_optimizer_state(model, optimizer, resumed["optimizer"])
    if config.compile:
        accelerator.unwrap_model(model).compile()  # in place: state_dict keys and checkpoints are unchanged
    params = [p for p in model.parameters() if p.requires_grad]  # those of the prepared model (for clipping)
    ema = EMA(ema_module.to(accelerator.device), accelerator.unwrap_model(model))
    if main:
        tqdm.write(f"effective batch {global_batch} ({config.batch_size} x {world} processes x "
                   f"{config.grad_accum} accumulation), lr {config.lr:g}")
    batches = infinite(make_loader(dataset, config, rank, world, samples_seen, collate_fn))
    log = MetricsLog(run_dir / "metrics.csv", main)
    bar = tqdm(total=config.steps, initial=step, disable=not (progress and main), desc=run_dir.name, unit="step")
    skipped, timer, seen_at_timer = skipped if main else 0, time.perf_counter(), samples_seen

    def checkpoint():
        model_state, optimizer_state = full_state(model, optimizer)  # every rank: a collective under FSDP2
        ema_module = ema.gather()
        if main:
            save_checkpoint(run_dir, step, model_state, ema_module, optimizer_state, samples_seen,
                            config.keep_checkpoints)
            if hooks.export:
                hooks.export(ema_module, step)
        accelerator.wait_for_everyone()

    try:
        while step < config.steps:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, config)
            logs: dict[str, float] = {}
            for micro in range(config.grad_accum):
                batch = next(batches)
                # Seed after fetching: creating the DataLoader iterator draws from the global RNG, and a resumed
                # run creates it at a later step than an uninterrupted one.
                torch.manual_seed(config.seed * 1_000_003 + (step * config.grad_accum + micro) * 1009 + rank)
                skipped += int(batch.pop("_skipped", 0))
                batch = _to_device(batch, accelerator.device)
                first = samples_seen + (micro * world + rank) * config.batch_size  # this slice's global position
                batch[RANDOM_KEY] = SampleRandom.at_positions(config.seed, first, _batch_len(batch), accelerator.device)
                with accelerator.accumulate(model), _autocast(accelerator, precision):
                    out = loss_fn(model, batch)
                    loss, extra = out if isinstance(out, tuple) else (out, {})
                    _check_finite(loss, step, run_dir, accelerator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.grad_clip > 0:
                        logs["grad_norm"] = _float(accelerator.clip_grad_norm_(params, config.grad_clip))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                logs["loss"] = logs.get("loss", 0.0) + float(loss.detach()) / config.grad_accum
                logs.update({k: float(v) for k, v in extra.items()})
            step += 1
            samples_seen += global_batch
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            ema.update(accelerator.unwrap_model(model), decay)  # DDP: the same on every rank; FSDP2: each its shard
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                logs = _mean_over_processes(accelerator, logs)
                now = time.perf_counter()
                logs["samples_per_s"] = (samples_seen - seen_at_timer) / max(now - timer, 1e-9)
                logs["lr"] = optimizer.param_groups[0]["lr"]
                logs["skipped_samples"] = _sum_over_processes(accelerator, skipped)
                logs["global_batch"], logs["processes"] = global_batch, world
                timer, seen_at_timer = now, samples_seen
                bar.set_postfix(loss=f"{logs['loss']:.4f}", per_s=f"{logs['samples_per_s']:.0f}")
                log.log(step, samples_seen, logs)
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint()
            evaluate = hooks.evaluate and _due(step, config.eval_every, config.steps)
            sample = hooks.sample and _due(step, config.sample_every, config.steps)
            if evaluate or sample:
                ema.gather()  # every rank (a collective under FSDP2); the main process runs the hooks
                if main:
                    with ema.on(accelerator.device) as ema_module:
                        if evaluate:
                            log.log(step, samples_seen, hooks.evaluate(ema_module, step))
                        if sample:
                            _write_samples(run_dir, step, hooks.sample(ema_module, step))
    except KeyboardInterrupt:
        saved = [s for s, _ in list_checkpoints(run_dir)]
        if world == 1 and step > 0 and step not in saved:
            tqdm.write(f"interrupted: saving step {step} so that --resume continues from here")
            checkpoint()
        raise
    finally:
        bar.close()
    return ema.gather()


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _batch_len(batch: dict) -> int:
    """Samples in a collated batch (the first dimension of its first tensor or the length of its first list)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
        if isinstance(value, (list, tuple)):
            return len(value)
    return 0


def _check_whole_parameters(accelerator: Accelerator) -> None:
    """The EMA and checkpoints handle plain, DDP and FSDP2 (DTensor) parameters: refuse the engines that
    flatten or partition them in other ways."""
    kind = accelerator.distributed_type.value
    if kind == "FSDP" and not accelerator.is_fsdp2:
        raise ValueError("`accelerate launch` with FSDP1 is not supported by the training loop (its flat parameters "
                         "break the per-parameter EMA): set `fsdp_version: 2` in the accelerate config "
                         "(--fsdp_version 2) — see docs/SCALING.md")
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(f"`accelerate launch` with {kind} is not supported by the training loop: its EMA, gradient "
                         "clipping and checkpoints need plain, DDP or FSDP2 parameters; use DDP "
                         "(`accelerate launch --multi_gpu`) or FSDP2 (`--use_fsdp --fsdp_version 2`) — see "
                         "docs/SCALING.md")


def _check_shardable(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """torch's fully_shard refuses 0-dim parameters (open_clip's logit_scale): say so in one line."""
    if accelerator.distributed_type.value != "FSDP":
        return
    scalars = [name for name, p in model.named_parameters() if p.ndim == 0]
    if scalars:
        raise ValueError(f"FSDP2 cannot shard the scalar parameter(s) {', '.join(scalars)} of this model "
                         f"({type(model).__name__}); train it with DDP (`accelerate launch --multi_gpu`)")


def _broadcast_weights(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every process (before `prepare`)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def _float(value) -> float:
    """A scalar tensor (a replicated DTensor under FSDP2) as a Python float."""
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def _check_same_step(accelerator: Accelerator, step: int, run_dir: Path) -> None:
    """Every process must resume from the same checkpoint (the run folder must be shared by all machines)."""
    if accelerator.num_processes == 1:
        return
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device))
    if bool((steps != step).any()):
        raise ValueError(f"processes resumed from different steps {steps.tolist()}: {run_dir} must be on a "
                         "file system that every process sees")


def _mean_over_processes(accelerator: Accelerator, logs: dict[str, float]) -> dict[str, float]:
    """Per-process loss values averaged over the processes (every rank logs the same keys at the same steps)."""
    if accelerator.num_processes == 1 or not logs:
        return logs
    names = sorted(logs)
    values = accelerator.reduce(torch.tensor([logs[k] for k in names], device=accelerator.device), "mean")
    return dict(zip(names, values.tolist()))


def _sum_over_processes(accelerator: Accelerator, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor([value], device=accelerator.device), "sum").item())


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_finite(loss: torch.Tensor, step: int, run_dir: Path, accelerator: Accelerator) -> None:
    bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        last = list_checkpoints(run_dir)
        kept = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
        raise TrainingError(f"the loss became {float(loss.detach())} at step {step}; {kept} "
                            "(lower --lr, use --grad-clip, or check the data)")


def _autocast(accelerator: Accelerator, precision: str):
    if precision == "bf16":
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16)
    return accelerator.autocast()  # fp16 (with accelerate's grad scaler) or nothing


def _mixed_precision(config: TrainConfig) -> str:
    """config.mixed_precision with "auto" resolved: `accelerate launch --mixed_precision` (or its config file)
    wins when given, else bf16 where the device does bf16 math natively (unclip.precision)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if config.mixed_precision == "auto" and launched:
        return launched
    device = "cpu" if config.cpu or not torch.cuda.is_available() else "cuda"
    return resolve_precision(config.mixed_precision, device)


def _prepare_run_dir(run_dir: Path, config: TrainConfig, extra_info: dict | None, resume: bool,
                     has_checkpoints: bool) -> None:
    for sub in ("checkpoints", "samples"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "train_config.json", {"train": config_to_dict(config), **(extra_info or {})})


def _write_samples(run_dir: Path, step: int, image) -> None:
    if image is None:
        return
    from .images import save_png
    save_png(image, run_dir / "samples" / f"step-{step:08d}.png")
