"""Tables and candle/PyTorch ratios from the files bench/classify.sh and bench/learn.sh write.

    python3 bench/ratios.py classify <out dir>
    python3 bench/ratios.py learn <out dir>

Throughput ratio = candle images/s ÷ PyTorch images/s (above 1: candle is faster); both are
the mean over the timed passes. Batch-1 latency is also given in ms.

Learning-step time ratio = atlas-serve ms/step ÷ PyTorch stacked ms/step per round (below 1:
atlas-serve is faster; the two ran back to back), and the median over the rounds; peak memory
ratio = the processes' maximum RSS.
"""
import glob
import json
import os
import sys

TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def cpu_name(machine):
    """The CPU's name with its family, model and stepping where the result has them (a virtual
    machine's name alone often does not tell the core)."""
    ids = [f"{k} {machine[k]}" for k in ("family", "model", "stepping") if machine.get(k) is not None]
    return machine["cpu"] + (f" ({', '.join(ids)})" if ids else "")


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
    machine = next((r["machine"] for r in candle if "machine" in r), None)
    if machine:
        print(f"Machine: {cpu_name(machine)}, {machine['logical_cores']} logical cores, "
              f"features {', '.join(machine['features']) or 'none of note'}\n")
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
    best_vs_best(candle, torch)
    if loads:
        print("\n1-minute load average before each run:\n")
        print("```")
        print("\n".join(l for l in loads if l))
        print("```")


def best_vs_best(candle, torch):
    """Each side's fastest dtype per model and batch: what a user of either would run."""
    best = {}
    for r in candle:
        if "error" not in r:
            key = (r["model"], r["batch"])
            if r["img_per_s"] > best.get(key, (0, ""))[0]:
                best[key] = (r["img_per_s"], r["dtype"])
    rows = []
    for (model, batch), (ips, dt) in best.items():
        theirs = [(v, k.split("_")[2]) for k, v in torch.items()
                  if k.startswith(f"classify_{model}_") and k.endswith(f"_bs{batch}_img_per_s")]
        if theirs:
            t, tdt = max(theirs)
            rows.append(f"| {model} | {batch} | {ips:.1f} ({dt}) | {t:.1f} ({tdt}) | **{ips / t:.2f}** |")
    if rows:
        print("\nBest against best (each side's fastest dtype):\n")
        print("| model | batch | candle img/s | PyTorch img/s | candle / PyTorch |")
        print("|---|---:|---:|---:|---:|")
        print("\n".join(rows))


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2


def learn(out):
    learn_f32(out)
    learn_bf16(out)


def learn_bf16(out):
    """atlas-serve's bf16 step against PyTorch's bf16 autocast and its faster configuration."""
    runs = {}
    for path in glob.glob(os.path.join(out, "candle-bf16-b*-r*.json")):
        b, r = os.path.basename(path)[len("candle-bf16-b"):-len(".json")].split("-r")
        c = json.loads(open(path).read().strip().splitlines()[-1])
        t = json.load(open(os.path.join(out, f"torch-bf16-b{b}-r{r}.json")))
        runs.setdefault(int(b), []).append((int(r), c, t))
    if not runs:
        return
    machine = next(iter(runs.values()))[0][2]["machine"]
    print(f"\nbf16 (atlas-serve `--dtype bf16`: linear products on the {next(iter(runs.values()))[0][1].get('bf16_kernel')} "
          f"kernel; PyTorch torch.autocast(cpu, bfloat16)), {cpu_name(machine)}, "
          f"features {', '.join(machine['features'])}:\n")
    print("| batch | round | atlas-serve bf16 ms/step (median, range) | PyTorch bf16 autocast "
          "| PyTorch f32 stacked (faster of the round's two runs) | vs autocast | vs PyTorch's fastest |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    summary = []
    for b in sorted(runs):
        vs_amp, vs_best = [], []
        for r, c, t in sorted(runs[b], key=lambda x: x[0]):
            ours = c["ms_per_step_median"]
            lo, hi = min(c["ms_per_step_all"]), max(c["ms_per_step_all"])
            amp = t[f"learn8_stacked_bs{b}_bf16amp_ms_per_step"]
            f32 = t[f"learn8_stacked_bs{b}_fp32_ms_per_step"]
            # The f32 round of the same sitting (torch_reference.py) counts too, when it ran.
            ref = os.path.join(out, f"torch-b{b}-r{r}.json")
            if os.path.exists(ref):
                f32 = min(f32, json.load(open(ref))[f"learn8_stacked_bs{b}_fp32_ms_per_step"])
            best = min(amp, f32)
            vs_amp.append(ours / amp)
            vs_best.append(ours / best)
            print(f"| {b} | {r} | {ours:,.0f} ({lo:,.0f}–{hi:,.0f}) | {amp:,.0f} | {f32:,.0f} "
                  f"| {ours / amp:.2f} | {ours / best:.2f} |")
        summary.append((b, median(vs_amp), median(vs_best)))
    print()
    for b, a, best in summary:
        print(f"batch {b} bf16: time ratio vs PyTorch bf16 autocast, median of rounds **{a:.2f}**; "
              f"vs PyTorch's fastest configuration **{best:.2f}**")


def learn_f32(out):
    runs = {}
    for path in glob.glob(os.path.join(out, "candle-b[0-9]*-r*.json")):
        b, r = os.path.basename(path)[len("candle-b"):-len(".json")].split("-r")
        c = json.loads(open(path).read().strip().splitlines()[-1])
        t = json.load(open(os.path.join(out, f"torch-b{b}-r{r}.json")))
        rss = int(open(os.path.join(out, f"torch-b{b}-r{r}.rss")).read().split()[-1]) / 2**20
        runs.setdefault(int(b), []).append((int(r), c, t, rss))
    if not runs:
        return
    print("| batch | round | atlas-serve ms/step (median, range) | PyTorch stacked | PyTorch loop "
          "| time vs stacked | vs loop | peak RSS atlas-serve / PyTorch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = []
    for b in sorted(runs):
        time_ratios, rss_ratios = [], []
        for r, c, t, rss in sorted(runs[b], key=lambda x: x[0]):
            ours = c["ms_per_step_median"]
            lo, hi = min(c["ms_per_step_all"]), max(c["ms_per_step_all"])
            st = t[f"learn8_stacked_bs{b}_fp32_ms_per_step"]
            lp = t[f"learn8_loop_bs{b}_fp32_ms_per_step"]
            time_ratios.append(ours / st)
            rss_ratios.append(c["peak_rss_gib"] / rss)
            print(f"| {b} | {r} | {ours:,.0f} ({lo:,.0f}–{hi:,.0f}) | {st:,.0f} | {lp:,.0f} "
                  f"| {ours / st:.2f} | {ours / lp:.2f} "
                  f"| {c['peak_rss_gib']:.2f} / {rss:.2f} GiB = {c['peak_rss_gib'] / rss:.2f} |")
        summary.append((b, median(time_ratios), min(time_ratios), max(time_ratios),
                        median(rss_ratios)))
    print()
    for b, t, lo, hi, m in summary:
        print(f"batch {b}: time ratio vs PyTorch stacked, median of rounds **{t:.2f}** "
              f"(rounds {lo:.2f}–{hi:.2f}); peak RSS ratio {m:.2f}")


if __name__ == "__main__":
    modes = {"classify": classify, "learn": learn}
    if len(sys.argv) != 3 or sys.argv[1] not in modes:
        sys.exit(__doc__)
    modes[sys.argv[1]](sys.argv[2])
