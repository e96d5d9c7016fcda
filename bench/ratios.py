"""Tables and candle/PyTorch ratios from the files bench/classify.sh and bench/learn.sh write.

    python3 bench/ratios.py classify <out dir>
    python3 bench/ratios.py learn <out dir>

Throughput ratio = candle images/s ÷ PyTorch images/s (above 1: candle is faster); both are
the mean over the timed passes. With several rounds (classify.sh's ROUNDS) the ratio is taken
per round, the two sides having run back to back, and its median over the rounds reported.

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


def torch_rounds(out):
    """PyTorch's classify figures by key, one per round in round order: torch-<figure>-r<n>.json
    and torch-bf16-<figure>-r<n>.json (older result dirs: one file per figure, round 1)."""
    rounds = {}
    meta = {}
    for path in glob.glob(os.path.join(out, "torch-*.json")):
        stem = os.path.basename(path)[:-len(".json")]
        head, sep, n = stem.rpartition("-r")
        r = int(n) if sep and n.isdigit() else 1
        with open(path) as f:
            d = json.load(f)
        for k, v in d.items():
            if k.startswith("classify_"):
                rounds.setdefault(k, {})[r] = v
        meta = meta or {k: d[k] for k in ("device", "threads", "torch") if k in d}
    return {k: [v[r] for r in sorted(v)] for k, v in rounds.items()}, meta


def candle_rounds(candle):
    """candle's records by (model, dtype, batch), in the order they ran (one per round)."""
    rounds = {}
    for r in candle:
        rounds.setdefault((r["model"], r["dtype"], r["batch"]), []).append(r)
    return rounds


def spread(xs, p=2):
    """The median of xs, with their range when there are several."""
    m = f"{median(xs):.{p}f}"
    return m if len(xs) == 1 else f"{m} ({min(xs):.{p}f}–{max(xs):.{p}f})"


def classify(out):
    candle = [json.loads(l) for l in open(os.path.join(out, "candle.jsonl")) if l.strip()]
    torch, meta = torch_rounds(out)
    rounds = candle_rounds(candle)
    loads = open(os.path.join(out, "load.txt")).read().split("\n") if os.path.exists(
        os.path.join(out, "load.txt")) else []
    machine = next((r["machine"] for r in candle if "machine" in r), None)
    if machine:
        print(f"Machine: {cpu_name(machine)}, {machine['logical_cores']} logical cores, "
              f"features {', '.join(machine['features']) or 'none of note'}\n")
    print(f"PyTorch: {meta.get('torch', '?')} on {meta.get('device', '?')}, "
          f"{meta.get('threads', '?')} threads; candle: {candle[0]['threads'] if candle else '?'} threads\n")
    print("Figures with several rounds give the median over the rounds and, in brackets, their range; "
          "the ratio is taken per round (the two sides ran back to back) and its median given.\n")
    print("| model | dtype | batch | candle img/s | PyTorch img/s | candle / PyTorch (throughput) "
          "| candle ms/batch | PyTorch ms/batch | rounds × candle passes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for (model, dtype, batch), runs in rounds.items():
        if "error" in runs[0]:
            print(f"| {model} | {dtype} | {batch} | unsupported: {runs[0]['error']} | | | | | |")
            continue
        ours = [r["img_per_s"] for r in runs]
        theirs = torch.get(f"classify_{model}_{TORCH_DTYPE[dtype]}_bs{batch}_img_per_s", [])
        pairs = list(zip(ours, theirs))
        per_round = [a / b for a, b in pairs]
        if per_round:
            ratios.append(median(per_round))
        ms = lambda xs: spread([batch / x * 1e3 for x in xs], 1) if xs else "–"
        print(f"| {model} | {dtype} | {batch} | {spread(ours)} | {spread(theirs) if theirs else '–'} "
              f"| **{spread(per_round) if per_round else '–'}** | {ms(ours)} | {ms(theirs)} "
              f"| {len(runs)} × {runs[0]['passes']} |")
    if ratios:
        print(f"\nlowest ratio {min(ratios):.2f}, highest {max(ratios):.2f} "
              f"({sum(1 for x in ratios if x >= 1.0)} of {len(ratios)} figures at or above 1.0)")
    batch_one_share(rounds, torch)
    best_vs_best(rounds, torch)
    if loads:
        print("\n1-minute load average before each run:\n")
        print("```")
        print("\n".join(l for l in loads if l))
        print("```")


def batch_one_share(rounds, torch):
    """Batch 1's throughput per image as a share of batch 32's, each side, per round (the k-th
    round of batch 1 against the k-th of batch 32); `rounds` as candle_rounds gives them."""
    rows = []
    for (model, dtype, batch), runs in rounds.items():
        big = rounds.get((model, dtype, 32))
        if batch != 1 or not big or "error" in runs[0] or "error" in big[0]:
            continue
        ours = [a["img_per_s"] / b["img_per_s"] * 100 for a, b in zip(runs, big)]
        key = f"classify_{model}_{TORCH_DTYPE[dtype]}_bs{{}}_img_per_s"
        theirs = [a / b * 100 for a, b in zip(torch.get(key.format(1), []), torch.get(key.format(32), []))]
        rows.append(f"| {model} | {dtype} | {spread(ours, 0)} % | "
                    f"{spread(theirs, 0) + ' %' if theirs else '–'} |")
    if rows:
        print("\nBatch 1 per image as a share of batch 32's throughput (median over rounds, range):\n")
        print("| model | dtype | candle | PyTorch |")
        print("|---|---|---:|---:|")
        print("\n".join(rows))


def best_vs_best(rounds, torch):
    """Each side's fastest dtype per model and batch (medians over rounds): what a user of
    either would run."""
    best = {}
    for (model, dtype, batch), runs in rounds.items():
        if "error" not in runs[0]:
            ips = median([r["img_per_s"] for r in runs])
            if ips > best.get((model, batch), (0, ""))[0]:
                best[(model, batch)] = (ips, dtype)
    rows = []
    for (model, batch), (ips, dt) in best.items():
        theirs = [(median(v), k.split("_")[2]) for k, v in torch.items()
                  if k.startswith(f"classify_{model}_") and k.endswith(f"_bs{batch}_img_per_s")]
        if theirs:
            t, tdt = max(theirs)
            rows.append(f"| {model} | {batch} | {ips:.1f} ({dt}) | {t:.1f} ({tdt}) | **{ips / t:.2f}** |")
    if rows:
        print("\nBest against best (each side's fastest dtype; medians over rounds):\n")
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
