"""Processes and optimisation engines: one process, DDP, FSDP2, or DeepSpeed ZeRO-2/3.

Launch with ``torchrun --nproc_per_node N -m diffrl_fast train ...`` or ``deepspeed --num_gpus N -m
diffrl_fast train ...``; the environment (RANK, WORLD_SIZE, LOCAL_RANK) says how many processes there are.

``Engine`` is what the trainer calls, whatever runs underneath:

    with engine.micro_step(boundary):      # boundary: the last backward before an optimiser step
        loss = ...                          # forward through model.forward_module
        engine.backward(loss)
    grad_norm = engine.step()               # clip, step (or skip a non-finite step), zero grads

- "none": torch AdamW, gradient clipping, non-finite steps skipped and counted.
- "ddp": the denoiser wrapped in DistributedDataParallel; gradients are averaged across processes only at
  the boundary (``no_sync`` for the other micro-steps).
- "fsdp": PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): every transformer block and resnet of the
  denoiser (and of a full fine-tune's frozen reference copy) is its own FSDP unit, then the root; parameters, gradients and
  AdamW state are sharded over the processes and all-gathered block by block for each forward (sampling
  included). ``dist.fsdp_mixed_precision`` computes in the autocast dtype with fp32 gradient reduction,
  ``dist.fsdp_cpu_offload`` keeps the shards and the optimiser step on the CPU. Checkpoints are
  torch.distributed.checkpoint (DCP) folders of the shards, written by every process, plus the gathered
  trainable weights.
- "deepspeed": a DeepSpeed engine built from ``dist.deepspeed_config`` (ZeRO stage, offload, ...) with the
  optimiser, learning rate and clipping of our config; DeepSpeed shards optimiser state (ZeRO-2) and
  parameters (ZeRO-3) and gathers sharded parameters for every forward, sampling included.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .._extras import require


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def means(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each value (a scalar tensor) averaged over the processes: one all-reduce and one host sync for all.

        The reduction runs on the current CUDA device under NCCL (which cannot reduce CPU tensors), else on CPU.
        """
        if not values:
            return {}
        device = (torch.device("cuda", torch.cuda.current_device())
                  if self.active and dist.get_backend() == "nccl" else torch.device("cpu"))
        t = torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in values.values()])
        if self.active:
            dist.all_reduce(t)
            t /= self.world_size
        return dict(zip(values, t.tolist()))


def init_distributed(engine: str, timeout_s: float = 600.0) -> DistContext:
    """Join the process group described by the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        from datetime import timedelta

        # CPU tensors (FSDP's CPU offload, object gathers) go through gloo beside NCCL on GPUs
        backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        if engine == "deepspeed":
            deepspeed = require("deepspeed", "dist.engine=deepspeed")
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local)


def learning_rate_at(step: int, lr: float, schedule: str, warmup: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) out of ``total``.

    Warmup: lr * (step + 1) / warmup for step < warmup; then with u = (step - warmup) / max(1, total - warmup):
    constant lr, linear lr * (1 - u), cosine lr * (1 + cos(pi u)) / 2.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    u = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return lr * (1.0 - u)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * u))
    return lr


class Engine:
    """Plain single-process optimisation (see module docstring for the interface)."""

    kind = "none"
    steps = 0  # optimiser steps taken (the learning-rate schedule's position; checkpointed by the trainer)
    steps_per_epoch: Optional[int] = None  # set by the trainer (``Trainer.step_groups``) before the first step

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (the length of the learning-rate schedule)."""
        if self.steps_per_epoch is None:
            raise RuntimeError("the trainer sets Engine.steps_per_epoch before the first optimiser step")
        return self.cfg.num_epochs * self.steps_per_epoch

    def _apply_schedule(self, optimizer) -> None:
        t = self.cfg.train
        lr = learning_rate_at(self.steps, t.learning_rate, t.lr_schedule, t.lr_warmup_steps, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.steps += 1

    def __init__(self, model, params, cfg, ctx: DistContext) -> None:
        t = cfg.train
        self.model, self.params, self.cfg, self.ctx = model, params, cfg, ctx
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                           weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
        self.skipped = 0
        # fp16 autocast needs loss scaling against gradient underflow (bf16 does not); weights stay fp32
        self.scaler = (torch.amp.GradScaler("cuda") if cfg.model.mixed_precision == "fp16" and torch.cuda.is_available() else None)

    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _grad_norm(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf")))

    def step(self) -> float:
        """One optimiser step; returns the gradient norm before clipping, NaN for a skipped non-finite step."""
        self._apply_schedule(self.optimizer)
        norm = self._grad_norm()
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lowers the loss scale
            self.skipped += 1
            return float("nan")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # checkpointing: the trainer writes weights and optimiser state itself for these engines
    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Inside the block the trainable parameters are whole on every process (sharding engines gather
        them; collective there, so every process must enter)."""
        yield


class DDPEngine(Engine):
    kind = "ddp"

    def __init__(self, model, params, cfg, ctx) -> None:
        super().__init__(model, params, cfg, ctx)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.local_rank] if torch.cuda.is_available() else None
        self.ddp = DistributedDataParallel(model.denoiser, device_ids=device_ids, broadcast_buffers=False)
        model.forward_module = self.ddp

    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        with contextlib.nullcontext() if boundary else self.ddp.no_sync():
            yield


# diffusers' transformer blocks (SD 1.x/SDXL's BasicTransformerBlock, SD3's JointTransformerBlock, FLUX's double
# and single blocks, FLUX.2's, Wan's, Qwen-Image's and Z-Image's blocks) and resnets: each becomes its own FSDP unit, as torchtitan wraps each
# transformer block. A whole down/up block would not do: SDXL's up_blocks[0] holds 1,207M of its 2,567M parameters.
FSDP_UNIT_CLASSES = ("BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                     "WanTransformerBlock", "QwenImageTransformerBlock", "ZImageTransformerBlock",
                     "Flux2TransformerBlock", "Flux2SingleTransformerBlock", "ResnetBlock2D")


def fsdp_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units of ``module`` in the order ``fully_shard`` is applied: every module of a class in
    FSDP_UNIT_CLASSES (the outermost where they nest), then ``module`` itself, the root, which keeps the rest
    (embeddings, input and output projections, norms, down- and upsamplers)."""
    units: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> None:
        for child in m.children():
            if type(child).__name__ in FSDP_UNIT_CLASSES:
                units.append(child)
            else:
                visit(child)

    visit(module)
    return units + [module]


def fsdp_shard(module: torch.nn.Module, mesh, mp_policy, offload_policy) -> list[torch.nn.Module]:
    """``fully_shard`` every unit of ``fsdp_units(module)``, the root last; returns the units."""
    from torch.distributed.fsdp import fully_shard

    units = fsdp_units(module)
    for unit in units[:-1]:
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    # the root's inputs stay as given (timesteps of 999 would round to 1000 in bf16); autocast covers the ops
    root_mp = dataclasses.replace(mp_policy, cast_forward_inputs=False)
    fully_shard(module, mesh=mesh, mp_policy=root_mp, offload_policy=offload_policy)
    return units


class FSDPEngine(Engine):
    kind = "fsdp"

    def __init__(self, model, params, cfg, ctx) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        if not ctx.active:
            raise ValueError("dist.engine=fsdp shards over several processes: launch with torchrun --nproc_per_node N "
                             "(or use dist.engine=none for one process)")
        if cfg.model.mixed_precision == "fp16":
            raise ValueError("dist.engine=fsdp supports model.mixed_precision=bf16 or no (fp16 needs a sharded loss "
                             "scaler): use bf16")
        if cfg.model.channels_last:
            raise ValueError("dist.engine=fsdp shards contiguous parameters only: set model.channels_last=false")
        d = cfg.dist
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mesh = init_device_mesh(device, (ctx.world_size,))
        compute = {"bf16": torch.bfloat16}.get(cfg.model.mixed_precision) if d.fsdp_mixed_precision else None
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute is not None else None)
        # pinned host memory makes the shards' copies to the GPU asynchronous; pinning needs CUDA
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if d.fsdp_cpu_offload else OffloadPolicy()
        fsdp_shard(model.denoiser, self.mesh, mp, offload)
        if getattr(model, "ref_denoiser", None) is not None:  # a full fine-tune's frozen reference, sharded too
            fsdp_shard(model.ref_denoiser, self.mesh, mp, offload)
        model.forward_module = model.denoiser
        if d.fsdp_cpu_offload and torch.cuda.is_available():  # the shards live on the CPU; compute stays on the GPU
            model.compute_device = torch.device("cuda", torch.cuda.current_device())
        # fully_shard replaced the parameters by sharded (DTensor) ones: the optimiser takes those
        params = [p for p in model.denoiser.parameters() if p.requires_grad]
        super().__init__(model, params, cfg, ctx)

    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        self.model.denoiser.set_requires_gradient_sync(boundary)  # reduce-scatter only at the accumulation boundary
        try:
            yield
        finally:
            self.model.denoiser.set_requires_gradient_sync(True)

    def _grad_norm(self) -> float:
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def full_state(self, trainable_only: bool = True, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The denoiser's whole fp32 weights (only the trainable ones by default) as CPU tensors, gathered
        shard by shard; on rank 0 only unless ``rank0_only`` is False (then on every rank). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model.denoiser, options=StateDictOptions(
            full_state_dict=True, cpu_offload=rank0_only, ignore_frozen_params=trainable_only))
        if trainable_only:
            names = {n for n, p in self.model.denoiser.named_parameters() if p.requires_grad}
            sd = {n: v for n, v in sd.items() if n in names}  # drops buffers
        return {n: v.full_tensor() if hasattr(v, "full_tensor") else v for n, v in sd.items()}

    def save_sharded(self, folder: Path) -> None:
        """Every process writes its shards of the trainable weights and of the optimiser state (DCP); collective.
        Before the first step there is no optimiser state to save (get_state_dict would initialise it with a
        zero-learning-rate step, advancing AdamW's step count)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        if not self.optimizer.state:
            state = {"model": get_model_state_dict(self.model.denoiser, options=options)}
        else:
            model_sd, optim_sd = get_state_dict(self.model.denoiser, self.optimizer, options=options)
            state = {"model": model_sd, "optim": optim_sd}
        dcp.save(state, checkpoint_id=str(folder))

    def load_sharded(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                             set_model_state_dict, set_state_dict)

        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        if any(k.startswith("optim.") for k in saved):
            model_sd, optim_sd = get_state_dict(self.model.denoiser, self.optimizer, options=options)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(folder))
            set_state_dict(self.model.denoiser, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=options)
        else:  # a checkpoint from before the first optimiser step: weights only
            state = {"model": get_model_state_dict(self.model.denoiser, options=options)}
            dcp.load(state, checkpoint_id=str(folder))
            set_model_state_dict(self.model.denoiser, state["model"], options=options)


def deepspeed_config(cfg, path: Optional[str]) -> dict:
    """The user's DeepSpeed JSON (ZeRO stage, offload, ...) with optimiser, learning rate, clipping and batch
    sizes taken from our config, so the two cannot disagree."""
    user: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"dist.deepspeed_config {p} does not exist (see configs/deepspeed_zero2.json)")
        user = json.loads(p.read_text())
    t = cfg.train
    if "scheduler" in user:
        raise ValueError(f"dist.deepspeed_config {path} has a 'scheduler' section: remove it and set train.lr_schedule / "
                         "train.lr_warmup_steps instead (the trainer sets the learning rate of every step)")
    ds = dict(user)
    ds["train_micro_batch_size_per_gpu"] = t.batch_size
    ds["gradient_accumulation_steps"] = 1  # the trainer marks accumulation boundaries itself
    ds["gradient_clipping"] = t.max_grad_norm if t.max_grad_norm > 0 else 0.0
    opt = ds.setdefault("optimizer", {"type": "Adam"})
    opt.setdefault("params", {}).update(lr=t.learning_rate, betas=[t.adam_beta1, t.adam_beta2], eps=t.adam_epsilon,
                                        weight_decay=t.adam_weight_decay)
    if opt.get("type", "").lower() in ("adam", "adamw"):
        opt["params"]["adam_w_mode"] = True
    ds.setdefault("zero_optimization", {"stage": 2})
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    if cfg.model.mixed_precision == "bf16":
        ds.setdefault("bf16", {"enabled": True})
    elif cfg.model.mixed_precision == "fp16":
        ds.setdefault("fp16", {"enabled": True})
    return ds


class DeepSpeedEngine(Engine):
    kind = "deepspeed"

    def __init__(self, model, params, cfg, ctx) -> None:
        deepspeed = require("deepspeed", "dist.engine=deepspeed")
        self.model, self.params, self.cfg, self.ctx = model, params, cfg, ctx
        self.skipped = 0
        self.ds_config = deepspeed_config(cfg, cfg.dist.deepspeed_config)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model.denoiser, model_parameters=params, config=self.ds_config)
        model.forward_module = self.engine
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(boundary)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self._apply_schedule(self.optimizer)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if not math.isfinite(norm):
            self.skipped += 1  # DeepSpeed clips and steps; a non-finite norm is counted and logged
        return norm

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full (unsharded) trainable parameters inside the block, under ZeRO-3."""
        if self.stage == 3:
            deepspeed = require("deepspeed", "dist.engine=deepspeed")
            with deepspeed.zero.GatheredParameters(self.params, modifier_rank=0):
                yield
        else:
            yield


def make_engine(model, params, cfg, ctx: DistContext) -> Engine:
    kind = cfg.dist.engine
    if kind == "deepspeed":
        return DeepSpeedEngine(model, params, cfg, ctx)
    if kind == "fsdp":
        return FSDPEngine(model, params, cfg, ctx)
    if kind == "ddp" or (kind == "auto" and ctx.active):
        return DDPEngine(model, params, cfg, ctx) if ctx.active else Engine(model, params, cfg, ctx)
    return Engine(model, params, cfg, ctx)
