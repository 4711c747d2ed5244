"""Sharded training of one expert with PyTorch FSDP2 (``ddfm train --fsdp``).

    torchrun --nproc_per_node=8 -m ddfm train --fsdp --activation-checkpointing --bf16 --init ... --out ...

An expert that does not fit one device is sharded over the ranks of its job: every
transformer block (the modules ``transformers`` checkpoints one by one, its
``GradientCheckpointingLayer``: the language model's decoder layers and the vision
tower's encoder layers) becomes one ``fully_shard`` unit, the rest of the model (embeddings,
projector, norms, head) the root unit. Each rank holds 1/world of every parameter, of
its gradient and of the AdamW state (of the trainable parameters only); a block's
parameters are all-gathered just before it runs and freed after. The helpers here are
the pieces the training loop (:mod:`ddfm.train.loop`) calls: shard the model, switch on
activation checkpointing (also without FSDP), measure what a rank holds, save and load
the sharded resume state (torch.distributed.checkpoint, one file per rank) and gather the
final consolidated Hugging Face checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

SHARDED_PREFIX = "sharded-"  # resume/sharded-STEP/: one DCP checkpoint (model + optimizer)


def transformer_blocks(model) -> list:
    """The model's transformer blocks, in module order: every ``GradientCheckpointingLayer``.

    That is transformers' own marker of a block (LLaVA: ``CLIPEncoderLayer`` x n in the
    vision tower, ``LlamaDecoderLayer`` x m in the language model), the same unit that
    activation checkpointing recomputes.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_activation_checkpointing(model) -> None:
    """Recompute each block's activations in backward (``torch.utils.checkpoint``, non-reentrant).

    transformers' own switch wraps every block's call in ``checkpoint``; FSDP2 sees the
    recomputation as part of the backward (its pre-forward hook does not all-gather again).
    """
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard_model(model, device: str, world: int, bf16: bool) -> None:
    """``fully_shard`` every transformer block, then the root, on a 1-D mesh of all ranks.

    Parameters stay fp32 (the master copy: a half-precision checkpoint is upcast first);
    with ``bf16`` the all-gathered parameters and the compute are bf16 and gradients are
    reduce-scattered in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``),
    on CPU (gloo) as on GPU (nccl). Frozen parameters are sharded too (memory) but get no
    gradient and no optimizer state. The parameters move to ``device`` block by block.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"--fsdp: {type(model).__name__} has no transformer blocks "
                         "(transformers' GradientCheckpointingLayer) to shard")
    mesh = init_device_mesh(device.split(":")[0], (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # the logits FSDP hands back are a view of its output; the loss never modifies them in
    # place, which is what this warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def local_bytes(tensor) -> int:
    """Bytes this rank holds of ``tensor``: the local shard of a DTensor, else the whole tensor."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def memory_per_rank(model, optimizer, world: int) -> dict[str, list[int]]:
    """Bytes of parameters, gradients and optimizer state held by each rank (from rank 0's view).

    Measured from the tensors themselves: under FSDP the local shards of the DTensors,
    under DDP or one process the full tensors. Collective when ``world > 1``.
    """
    import torch
    import torch.distributed as dist

    params = list(model.parameters())
    mine = {"parameters": sum(local_bytes(p) for p in params),
            "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                             if torch.is_tensor(v))}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    return {k: [r[k] for r in ranks] for k in mine}


def save_sharded(resume_dir: Path, step: int, model, optimizer, rank: int) -> str:
    """Write model + optimizer state as a DCP checkpoint ``resume_dir/sharded-STEP/``; collective.

    Each rank writes its own shards (``__RANK_0.distcp``), rank 0 the ``.metadata`` last.
    Returns the directory's name, which the caller records in ``state.pt`` once every rank
    is done: the checkpoint counts only from then on (a kill before leaves the old one).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"{SHARDED_PREFIX}{step:08d}"
    if rank == 0 and (resume_dir / name).exists():  # left half-written by a killed run
        shutil.rmtree(resume_dir / name)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=resume_dir / name)
    return name


def drop_stale_sharded(resume_dir: Path, keep: str) -> None:
    """Remove every ``sharded-*`` directory but ``keep`` (older checkpoints, half-written ones)."""
    for d in resume_dir.glob(SHARDED_PREFIX + "*"):
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def load_sharded(directory: Path, model, optimizer) -> None:
    """Load a :func:`save_sharded` checkpoint into the sharded model and optimizer; collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (directory / ".metadata").is_file():
        raise ValueError(f"{directory}: the sharded resume state is incomplete (no .metadata)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model) -> dict:
    """The whole model's state dict gathered to rank 0's CPU (other ranks get ``{}``); collective.

    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` gathers one tensor at
    a time to CPU, so no device ever holds the unsharded model. Tied parameters (one
    parameter under two names, e.g. ``lm_head.weight`` and the input embeddings) come back
    as two copies; they are made one tensor again, so ``save_pretrained`` writes it once,
    as it does for the unsharded model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:  # rank 0
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in first and name in state:
                state[name] = state[first[id(param)]]
            first.setdefault(id(param), name)
    return state
