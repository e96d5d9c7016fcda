#!/usr/bin/env python3
"""PyTorch's aTLAS learning step on the CPU with bf16 autocast, for the learning comparison.

The team's torch_reference.py times the step on the CPU at float32 only (its autocast runs on
GPUs). This script runs the same step, built the same way (random ViT-B/32 image tower with
projection, 8 random task vectors stacked per tensor, θ = θ0 + Σ λ τ per block, cosine logits
at scale 100 against 10 random unit heads, cross-entropy, AdamW, gradient clipping at 1), with
`torch.autocast("cpu", dtype=torch.bfloat16)` around the forward and the loss, as the
reference does on a GPU; and at float32 in the same process, so the two can be read against
torch_reference.py's figure. Prints one JSON document with the machine's CPU model and flags.

    python3 bench/torch_learn_bf16.py --batches 8 --iters 3 --threads 2

Needs: pip install torch transformers.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from torch_cpu_bf16 import machine  # beside this script: the CPU model and its bf16 flags


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="8")
    ap.add_argument("--modes", default="fp32,bf16amp", help="fp32 and/or bf16amp")
    ap.add_argument("--n-tv", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3, help="timed steps after two warm-up steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = CLIPVisionConfig()  # the transformers default is ViT-B/32
    cfg._attn_implementation = "sdpa"
    model = CLIPVisionModelWithProjection(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [k for k, _ in model.named_parameters()]
    base = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    stacked = {k: torch.randn((a.n_tv, *v.shape), generator=g) * 1e-3 for k, v in base.items()}
    head = F.normalize(torch.randn(10, cfg.projection_dim), dim=-1)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": machine(), "n_tv": a.n_tv}
    for bs in map(int, a.batches.split(",")):
        for mode in a.modes.split(","):
            amp = mode == "bf16amp"
            lam = torch.zeros(a.n_tv, len(names), requires_grad=True)
            opt = torch.optim.AdamW([lam], lr=1e-1, weight_decay=0.1)
            x = torch.randn(bs, 3, cfg.image_size, cfg.image_size)
            y = torch.randint(0, 10, (bs,))

            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    theta = {k: base[k] + torch.tensordot(lam[:, j], stacked[k], dims=1)
                             for j, k in enumerate(names)}
                    emb = functional_call(model, theta, (x,)).image_embeds
                    logits = 100.0 * F.normalize(emb.float(), dim=-1) @ head.T
                    loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([lam], 1.0)
                opt.step()

            for _ in range(2):
                step()
            times = []
            for _ in range(a.iters):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            ms = 1e3 * sum(times) / len(times)
            out[f"learn{a.n_tv}_stacked_bs{bs}_{mode}_ms_per_step"] = ms
            print(f"batch {bs} {mode}: {ms:.0f} ms per step", flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
