#!/usr/bin/env python3
"""Latency of the served path on the demo world, against a running `atlas-serve serve`.

Measures (1) the time from POST /compositions of a 16-shot few-shot job (all task vectors,
per-block layout) to a servable composition, and (2) /classify latency at batch 1 on that
cached composition, sequential requests over loopback (p50, p99). Standard library only.

    atlas-serve demo export --preset ci --task position --split train --out /tmp/pos
    python3 bench/serve_latency.py --url http://127.0.0.1:8080 --images /tmp/pos --requests 500
"""
import argparse
import base64
import json
import os
import statistics
import time
import urllib.request


def call(url, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--images", required=True, help="an ImageFolder from `demo export`")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--requests", type=int, default=500)
    a = ap.parse_args()

    classes = sorted(os.listdir(a.images))
    examples, probe = [], None
    for label, c in enumerate(classes):
        files = sorted(os.listdir(os.path.join(a.images, c)))[: a.shots]
        for f in files:
            raw = open(os.path.join(a.images, c, f), "rb").read()
            probe = probe or base64.b64encode(raw).decode()
            examples.append({"image": base64.b64encode(raw).decode(), "label": label})
    head = call(a.url, "/heads", {"classes": classes})["id"]

    t0 = time.perf_counter()
    job = call(a.url, "/compositions", {
        "objective": "few_shot", "config": {"augment": False},
        "tasks": [{"classes": classes, "examples": examples}],
    })
    while True:
        c = call(a.url, f"/compositions/{job['id']}")
        if c["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.05)
    servable = time.perf_counter() - t0
    first = time.perf_counter()
    call(a.url, "/classify", {"composition": job["id"], "head": head, "images": [probe], "top_k": 1})
    first = time.perf_counter() - first  # composes on this cache miss

    body = {"composition": job["id"], "head": head, "images": [probe], "top_k": 1}
    times = []
    for _ in range(a.requests):
        s = time.perf_counter()
        call(a.url, "/classify", body)
        times.append((time.perf_counter() - s) * 1e3)
    times.sort()
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    print(json.dumps({
        "job": {"status": c["status"], "examples": len(examples), "epochs": len(c["history"]),
                "before": c.get("summary", {}).get("before"), "after": c.get("summary", {}).get("after")},
        "post_to_servable_s": round(servable, 2),
        "first_classify_ms_with_compose": round(first * 1e3, 2),
        "classify_batch1_cached_ms": {"n": len(times), "p50": round(p(0.50), 2), "p99": round(p(0.99), 2),
                                      "mean": round(statistics.mean(times), 2)},
        "load_average": os.getloadavg(),
    }, indent=1))


if __name__ == "__main__":
    main()
