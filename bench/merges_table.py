"""The table of bench/merges.sh: one row per <method>.json in the given directory (FusionBench's
method order), with the time scaled to the whole model where a method was timed on fewer
encoder layers (its per-tensor work grows linearly with layers)."""
import json
import os
import sys

from ratios import cpu_name

ORDER = ["simple_average", "task_arithmetic", "ties_merging", "dare_task_arithmetic",
         "dare_ties_merging", "breadcrumbs", "magmax", "iso_c", "iso_cts", "tsv_m", "wudi",
         "regmean", "regmean_plusplus", "fisher_merging"]

out = sys.argv[1]
rows = [json.load(open(os.path.join(out, f"{m}.json"))) for m in ORDER
        if os.path.exists(os.path.join(out, f"{m}.json"))
        and os.path.getsize(os.path.join(out, f"{m}.json")) > 0]
r0 = rows[0]
mc = r0["machine"]
print(f"# Merge costs: {r0['model']} image tower, {r0['n_tv']} task vectors ({r0['store']})\n")
print(f"Machine: {cpu_name(mc)}, {mc['logical_cores']} logical cores, {', '.join(mc['features'])}. "
      "Command: `bench/merges.sh` (release build). Peak memory is the process's maximum RSS, "
      "the backbone (θ0 at f32) and the task vectors included; \"after setup\" is before the "
      "merge starts. Methods marked * were timed on fewer encoder layers (`--layers`) and their "
      "time scaled to the whole model; their memory is that of the smaller model.\n")
print("| method | time (s) | peak RSS (GiB) | after setup (GiB) | images per input | layers timed |")
print("|---|---:|---:|---:|---:|---:|")
for r in rows:
    layers, full = r.get("layers"), r.get("model_layers")
    scaled = layers is not None and full is not None and layers < full
    secs = r["seconds"] * (full / layers if scaled else 1)
    ex = r["examples"] if r["examples"] is not None else ""
    name = f"`{r['method']}`" + (" *" if scaled else "")
    timed = f"{layers} of {full}" if layers is not None else ""
    print(f"| {name} | {secs:.1f} | {r['peak_rss_gib']:.2f} | {r['peak_rss_gib_after_setup']:.2f} "
          f"| {ex} | {timed} |")
