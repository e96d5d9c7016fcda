#!/usr/bin/env python3
"""The best PyTorch eager configuration on a CPU with bf16 units, for the classify comparison.

The team's torch_reference.py times classification on the CPU at float32 only. On CPUs with
AVX512-BF16 or AMX, PyTorch's bf16 path (`model.to(torch.bfloat16)`, eager, oneDNN) is several
times faster, and that is the figure atlas-serve is measured against there. This script times
the random ViT image tower (+ projection) at float32 and bfloat16 per batch size, with the
machine's CPU model and bf16-relevant flags, and prints one JSON document.

    python3 bench/torch_cpu_bf16.py --models B/32 --batches 1,8,32 --threads 2

bench/classify.sh runs it for the bf16 figures on a CPU (with --out).

Needs: pip install torch transformers.
"""
import argparse
import copy
import json
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

SHAPES = {
    "B/32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, patch_size=32, image_size=224, projection_dim=512),
    "B/16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, patch_size=16, image_size=224, projection_dim=512),
    "L/14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768),
}
FLAGS = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"]


def machine():
    info = open("/proc/cpuinfo").read().splitlines()
    field = lambda k: next((l.split(":", 1)[1].strip() for l in info
                            if l.split(":")[0].strip() == k), "unknown")
    flags = field("flags").split()
    number = lambda k: int(field(k)) if field(k).isdigit() else None
    return {"cpu": field("model name"), "family": number("cpu family"), "model": number("model"),
            "stepping": number("stepping"), "features": [f for f in FLAGS if f in flags]}


def images_per_second(model, batch, dtype, iters, max_seconds):
    x = torch.randn(batch, 3, 224, 224, dtype=dtype)
    with torch.inference_mode():
        model(pixel_values=x)  # warm-up (oneDNN picks and caches its kernels)
        times = []
        start = time.perf_counter()
        for _ in range(iters):
            t = time.perf_counter()
            model(pixel_values=x)
            times.append(time.perf_counter() - t)
            if time.perf_counter() - start > max_seconds:
                break
    times.sort()
    return batch / times[len(times) // 2], len(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="B/32")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", help="also write the figures as torch_reference.py names them "
                    "(classify_<model>_<dtype>_bs<batch>_img_per_s), for bench/ratios.py")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": machine(), "rows": []}
    for name in a.models.split(","):
        base = CLIPVisionModelWithProjection(CLIPVisionConfig(**SHAPES[name])).eval()
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            model = copy.deepcopy(base).to(dtype)  # .to() converts in place
            for b in map(int, a.batches.split(",")):
                ips, passes = images_per_second(model, b, dtype, a.iters, a.max_seconds)
                out["rows"].append({"model": name, "dtype": dt, "batch": b,
                                    "img_per_s": ips, "passes": passes})
                print(f"{name} {dt:9} batch {b:4}: {ips:8.1f} img/s", flush=True)
    print(json.dumps(out, indent=1))
    if a.out:
        flat = {"torch": out["torch"], "threads": out["threads"], "device": "cpu",
                "machine": out["machine"]}
        for r in out["rows"]:
            flat[f"classify_{r['model']}_{r['dtype']}_bs{r['batch']}_img_per_s"] = r["img_per_s"]
        with open(a.out, "w") as f:
            json.dump(flat, f, indent=1)


if __name__ == "__main__":
    main()
