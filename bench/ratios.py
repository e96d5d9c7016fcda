"""Tables and candle/PyTorch ratios from the files bench/classify.sh writes.

    python3 bench/ratios.py classify <out dir>

Throughput ratio = candle images/s ÷ PyTorch images/s (above 1: candle is faster); both are
the mean over the timed passes. Batch-1 latency is also given in ms.
"""
import glob
import json
import os
import sys

TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def classify(out):
    candle = [json.loads(l) for l in open(os.path.join(out, "candle.jsonl")) if l.strip()]
    torch = {}
    meta = {}
    for path in sorted(glob.glob(os.path.join(out, "torch-*.json"))):
        with open(path) as f:
            d = json.load(f)
        torch.update({k: v for k, v in d.items() if k.startswith("classify_")})
        meta = {k: d[k] for k in ("device", "threads", "torch") if k in d}
    loads = open(os.path.join(out, "load.txt")).read().split("\n") if os.path.exists(
        os.path.join(out, "load.txt")) else []
    print(f"PyTorch: {meta.get('torch', '?')} on {meta.get('device', '?')}, "
          f"{meta.get('threads', '?')} threads; candle: {candle[0]['threads'] if candle else '?'} threads\n")
    print("| model | dtype | batch | candle img/s | PyTorch img/s | candle / PyTorch (throughput) "
          "| candle ms/batch | PyTorch ms/batch | candle passes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for r in candle:
        if "error" in r:
            print(f"| {r['model']} | {r['dtype']} | {r['batch']} | unsupported: {r['error']} | | | | | |")
            continue
        key = f"classify_{r['model']}_{TORCH_DTYPE[r['dtype']]}_bs{r['batch']}_img_per_s"
        t = torch.get(key)
        ratio = r["img_per_s"] / t if t else None
        if ratio is not None:
            ratios.append(ratio)
        fmt = lambda x, p=1: "–" if x is None else f"{x:.{p}f}"
        t_ms = r["batch"] / t * 1e3 if t else None
        print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {fmt(r['img_per_s'], 2)} | {fmt(t, 2)} "
              f"| **{fmt(ratio, 2)}** | {fmt(r['ms_mean'])} | {fmt(t_ms)} | {r['passes']} |")
    if ratios:
        print(f"\nlowest ratio {min(ratios):.2f}, highest {max(ratios):.2f} "
              f"({sum(1 for x in ratios if x >= 1.0)} of {len(ratios)} figures at or above 1.0)")
    if loads:
        print("\n1-minute load average before each run:\n")
        print("```")
        print("\n".join(l for l in loads if l))
        print("```")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "classify":
        sys.exit(__doc__)
    classify(sys.argv[2])
