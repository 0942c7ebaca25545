"""Check that sharded training of the packed encoder equals single-process training on the union batch.

Run with torchrun, two (or more) processes::

    torchrun --nproc_per_node=2 scripts/distributed_check.py --backend gloo        # CPU
    torchrun --nproc_per_node=2 scripts/distributed_check.py --backend nccl        # one GPU per process

Each step draws a global batch of mixed-size images; rank ``r`` encodes images ``r, r + world, ...`` as its own
packed sub-batch. The same steps run with DDP and with FSDP2 (``fully_shard`` per block, then the root), and,
in every process, on an unwrapped copy of the model that encodes the whole batch in one packed call. Losses,
gradients (gathered from their shards) and the final parameters must agree within a tolerance set by the dtype.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import packvit_native as pv
from packvit_native.config import EncoderConfig

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def tiny_config() -> EncoderConfig:
    # Deterministic: no drop path and no RoPE augmentation, so every process computes the same function.
    return EncoderConfig(
        family="dinov3", patch_size=4, hidden_size=64, num_layers=3, num_heads=4, mlp_hidden=128, mlp="swiglu",
        activation="silu", layer_scale=True, num_cls=1, num_registers=2, head="cls", key_bias=False,
        pos_embed_rescale=None,
    )  # fmt: skip


def global_batch(step: int, size: int, config: EncoderConfig) -> list[Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    shapes = torch.randint(1, 9, (size, 2), generator=g).tolist()
    p = config.patch_size
    return [torch.randn(config.num_channels, h * p, w * p, generator=g) for h, w in shapes]


def loss_sum(
    model: torch.nn.Module, images: list[Tensor], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Sum over this batch of a per-token and a per-image term (normalised later by the global counts).

    Each term projects the features on fixed random directions first: a plain function of the final-normed
    tokens (their mean square, say) is almost constant and would leave gradients of pure rounding noise.
    """
    patches, grid = pv.patchify(images, tiny_config().patch_size)
    out = model(patches.to(device, dtype), grid, return_dict=True)
    g = torch.Generator().manual_seed(7)
    proj = torch.randn(out.last_hidden_state.shape[-1], 4, generator=g).to(device)
    tokens = (out.last_hidden_state.float() @ proj).tanh().sum()
    return tokens + (out.pooler_output.float() @ proj).square().sum()


def full_grad(p: torch.nn.Parameter) -> Tensor:
    g = p.grad
    return (g.full_tensor() if isinstance(g, DTensor) else g).float()


def full_param(p: torch.nn.Parameter) -> Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().float()


def rel_err(a: Tensor, b: Tensor) -> float:
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


def run(mode: str, base: pv.PackedVisionEncoder, args, device, dtype) -> tuple[bool, list[str]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = copy.deepcopy(base)
    model = copy.deepcopy(base)
    if args.checkpoint_every:
        for m in (model, reference):
            m.set_activation_checkpointing(args.checkpoint_every)
    if args.compile:
        # Both sides compiled: the check isolates what distribution changes, not compiled-vs-eager rounding.
        for m in (model, reference):
            m.compile_blocks()
    if mode == "ddp":
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(wrapped.parameters(), lr=args.lr, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=args.lr, momentum=0.9)
    tol, ok, lines = TOLERANCE[dtype], True, []
    for step in range(args.steps):
        images = global_batch(step, args.images, base.config)
        tokens = sum(im.shape[1] * im.shape[2] for im in images) // base.config.patch_size**2
        norm = float(tokens + len(images))
        # Both wrappers average gradients over ranks, so each rank's loss is scaled by the world size.
        local = loss_sum(wrapped, images[rank::world], device, dtype) / norm
        (local * world).backward()
        loss = local.detach().clone()
        dist.all_reduce(loss)
        ref_loss = loss_sum(reference, images, device, dtype) / norm
        ref_loss.backward()
        ref_loss = ref_loss.detach()
        grad_err = max(
            rel_err(full_grad(p), q.grad.float())
            for p, q in zip(wrapped.parameters(), reference.parameters(), strict=True)
        )
        loss_err = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
        step_ok = loss_err <= tol and grad_err <= tol
        ok &= step_ok
        lines.append(
            f"{mode:>4} step {step}: loss {float(loss):.6f} vs single {float(ref_loss):.6f} (rel {loss_err:.1e}), "
            f"max rel grad err {grad_err:.1e} {'ok' if step_ok else 'FAIL'}"
        )
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    param_err = max(
        rel_err(full_param(p), q.detach().float())
        for p, q in zip(wrapped.parameters(), reference.parameters(), strict=True)
    )
    ok &= param_err <= tol
    lines.append(f"{mode:>4} after {args.steps} steps: max rel parameter err {param_err:.1e}")
    if mode == "fsdp":
        save_ok, line = check_save(model, reference, tol)
        ok &= save_ok
        lines.append(line)
    return ok, lines


def check_save(
    model: pv.PackedVisionEncoder, reference: pv.PackedVisionEncoder, tol: float
) -> tuple[bool, str]:
    """A sharded model's save_pretrained refuses with the recipe; the recipe (the full state gathered on every
    rank, saved on rank 0) writes the trained weights."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model.save_pretrained(Path(tmp) / f"shards-{dist.get_rank()}")
            refused = False
        except ValueError as e:
            refused = "sharded across ranks" in str(e)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # every rank; only rank 0 receives it
        err = 0.0
        if dist.get_rank() == 0:
            saved = pv.from_pretrained(model.save_pretrained(Path(tmp) / "full", state_dict=state))
            expected = reference.state_dict()
            err = max(
                rel_err(v.float(), expected[k].detach().float().cpu()) for k, v in saved.state_dict().items()
            )
    ok = refused and err <= tol
    return (
        ok,
        f"fsdp save_pretrained refused on the shards: {refused}; gathered and saved: max rel err {err:.1e}",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"], help="process-group backend")
    parser.add_argument("--attn", default=None, help="attention backend (default: sdpa on CPU, auto on GPU)")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--images", type=int, default=6, help="images in each global batch")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="activation checkpointing (0: off)")
    parser.add_argument("--compile", action="store_true", help="compile the blocks (dynamic shapes)")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    attn = args.attn or ("auto" if device.type == "cuda" else "sdpa")
    torch.manual_seed(0)  # the same initial weights in every process
    base = pv.PackedVisionEncoder(tiny_config(), attn_backend=attn).to(device, dtype).train()
    ok = True
    lines = [f"world {dist.get_world_size()}, {args.backend}, {device.type}, {dtype}, attention {attn}"]
    for mode in ("ddp", "fsdp"):
        mode_ok, mode_lines = run(mode, base, args, device, dtype)
        ok &= mode_ok
        lines += mode_lines
    verdict = torch.tensor([int(ok)], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    if rank == 0:
        print("\n".join(lines))
        print("PASS" if verdict.item() else "FAIL", f"(tolerance {TOLERANCE[dtype]:.0e} relative)")
    # The DDP/FSDP wrappers of each run hold reference cycles; collect them (and their communication hooks)
    # while the process group is alive, and let every rank get here, before tearing the group down. Otherwise
    # a gloo rank can abort at exit when a wrapper is destroyed after its group.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if verdict.item() else 1


if __name__ == "__main__":
    sys.exit(main())
