"""Train the packed encoder end to end: encoder -> 2x2 patch merger -> a toy language model's loss.

This is the shape of multimodal pretraining with an unfrozen vision tower, in miniature. Images of mixed
sizes are packed into one sequence (no padding), encoded, every 2x2 block of patch tokens is merged into one
visual token, and a small causal language model reads each image's visual tokens followed by its caption and
is trained to predict the caption. The encoder, the merger and the language model all learn.

    python examples/train_merger.py                         # CPU, tiny random encoder, reference attention
    python examples/train_merger.py --device cuda           # GPU, fastest attention kernel, bf16 autocast
    python examples/train_merger.py --model facebook/dinov3-vits16-pretrain-lvd1689m --device cuda
    python examples/train_merger.py --checkpoint-every 1 --compile

The captions are computed from the pixels (the brightness of each channel, bucketed), so the loss can only
fall below the language model's prior if gradients reach the encoder through the merger.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import packvit_native as pv
from packvit_native.config import EncoderConfig
from weights_convert.presets import preset

BUCKETS = 8  # caption vocabulary: one token per brightness bucket, plus BOS
BOS = BUCKETS


def merge_index(grid_thw: Tensor) -> Tensor:
    """``[N / 4, 4]`` rows of the packed patch tokens that form each 2x2 block, frame by frame, row-major."""
    index, start = [], 0
    for t, h, w in grid_thw.tolist():
        if h % 2 or w % 2:
            raise ValueError(f"a 2x2 merger needs even patch grids, got {h}x{w}")
        for _ in range(t):
            r = torch.arange(h * w).reshape(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3)  # [h/2, w/2, 2, 2]
            index.append(start + r.reshape(-1, 4))
            start += h * w
    return torch.cat(index)


class PatchMerger(nn.Module):
    """Norm, concatenate each 2x2 block of patch tokens, and project to the language model's width."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Sequential(nn.Linear(4 * dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, tokens: Tensor, index: Tensor) -> Tensor:
        return self.proj(self.norm(tokens)[index].flatten(1))  # [N/4, 4*D] -> [N/4, out_dim]


class ToyLanguageModel(nn.Module):
    """Token embedding, one causal transformer layer, and a vocabulary head."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def loss(self, visual: list[Tensor], captions: Tensor) -> Tensor:
        """Next-token loss on each caption, read after that image's visual tokens (padded on the right)."""
        text = self.embed(
            torch.cat([torch.full_like(captions[:, :1], BOS), captions[:, :-1]], 1)
        )  # [B, L, dim]
        seqs = [torch.cat([v, t.to(v.dtype)]) for v, t in zip(visual, text, strict=True)]
        lengths = [len(s) for s in seqs]
        x = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # [B, Lmax, dim]
        n = x.shape[1]
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
        pad = torch.arange(n, device=x.device)[None] >= torch.tensor(lengths, device=x.device)[:, None]
        h = self.layer(x, src_mask=causal, src_key_padding_mask=pad)
        caption_len = captions.shape[1]
        text_h = torch.stack([h[i, lengths[i] - caption_len : lengths[i]] for i in range(len(seqs))])
        return F.cross_entropy(self.head(text_h).flatten(0, 1).float(), captions.flatten())


def tiny_encoder_config() -> EncoderConfig:
    return preset("dinov3_vits16").config(
        patch_size=4,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        mlp_hidden=128,
        num_registers=0,
        drop_path_rate=0.1,
    )


def make_batch(generator: torch.Generator, size: int, patch_size: int) -> tuple[list[Tensor], Tensor]:
    """Images of mixed even patch grids, and captions: each channel's mean brightness, bucketed."""
    images, captions = [], []
    for _ in range(size):
        h, w = (2 * int(v) for v in torch.randint(1, 5, (2,), generator=generator))
        level = torch.rand(3, 1, 1, generator=generator)
        images.append(
            level * 2 - 1 + 0.3 * torch.randn(3, h * patch_size, w * patch_size, generator=generator)
        )
        captions.append((level.flatten() * BUCKETS).long().clamp(max=BUCKETS - 1))
    return images, torch.stack(captions)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="a DINOv3 checkpoint (hub id or directory); default: a tiny random encoder"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default=None, help="attention backend (default: sdpa on CPU, auto on GPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=6, help="images per step")
    parser.add_argument("--lm-dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="activation checkpointing (0: off)")
    parser.add_argument("--compile", action="store_true", help="compile the encoder blocks")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    attn = args.attn or ("sdpa" if device.type == "cpu" else "auto")
    torch.manual_seed(0)
    if args.model:
        encoder = pv.from_pretrained(args.model, attn_backend=attn, device=device, dtype=torch.float32)
    else:
        encoder = pv.PackedVisionEncoder(tiny_encoder_config(), attn_backend=attn, device=device)
    encoder.train().set_activation_checkpointing(args.checkpoint_every)
    if args.compile:
        encoder.compile_blocks()
    merger = PatchMerger(encoder.config.hidden_size, args.lm_dim).to(device)
    lm = ToyLanguageModel(args.lm_dim, BUCKETS + 1).to(device)
    params = [*encoder.parameters(), *merger.parameters(), *lm.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    # The flash kernels take bf16/fp16 only; autocast keeps fp32 master weights. The CPU runs plain fp32.
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(args.steps):
        images, captions = make_batch(generator, args.batch, encoder.config.patch_size)
        patches, grid_thw = encoder.patchify(images)  # one packed tensor for the whole batch
        index = merge_index(grid_thw).to(device)
        with autocast:
            tokens = encoder(patches.to(device), grid_thw)  # [N, D] patch tokens, packed
            visual = merger(tokens, index)  # [N/4, lm_dim]
            per_image = visual.split([t * h * w // 4 for t, h, w in grid_thw.tolist()])
            loss = lm.loss(list(per_image), captions.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        print(f"step {step:3d}  loss {losses[-1]:.4f}  ({len(images)} images, {len(patches)} patches packed)")
    return losses


if __name__ == "__main__":
    main()
