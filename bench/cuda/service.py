#!/usr/bin/env python3
"""The service for real on each device: the same HTTP requests against `atlas-serve serve` on
each configuration in turn, their probabilities compared against the first configuration's.

    bench/cuda/service.py --bin atlas-serve --out DIR [--configs cpu:f32,cuda:f16] [--tol 0.02]

It writes a random image tower (`bench write-model`, ViT-B/32 by default) and two random
"fine-tuned" copies (other seeds) into a task-vector library, and synthetic PNGs of four
classes. Then, per configuration (device:dtype), it starts `serve --model ... --tv-dir ...
--device D --dtype T` on loopback with its own data directory and, over HTTP:
  1. builds the two task vectors from the copies (POST /task-vectors, checkpoint);
  2. makes a head of the four class names;
  3. classifies every image with the pre-trained model, an explicit composition (0.3, 0.2),
     and one task vector at coefficient 100 (at f16 that once gave `probability: null`);
  4. runs a short few-shot learning job on the images and classifies with its result;
  5. times single-image requests (batch-1 latency over HTTP, median of 20).
Every probability must be finite, and with the pre-trained model and the explicit composition
each configuration's probabilities must lie within --tol of the first configuration's (the
others' gaps are reported, not held: see HELD). Writes service.json (everything) and
prints a summary; exits 1 when a check fails. Standard library only, so it runs on the GPU
machine's Python as it is.
"""
import argparse
import base64
import http.client
import json
import math
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

CLASSES = ["circle", "square", "triangle", "cross"]
PER_CLASS = 6
TERMINAL = {"succeeded", "failed", "cancelled"}
# Compositions whose probabilities are held within --tol of the reference's. At coefficient 100
# the weights are a hundred random deltas deep and any rounding moves the outputs (bf16 against
# f32 on a CPU: 0.13 on the tiny tower), so that one is held to finite outputs; a learned one
# follows its device's rounding through every step.
HELD = ("base", "explicit")


def png(size, cls, i):
    """A size x size RGB PNG: class `cls` sets the colour ramp, `i` shifts it."""
    rows = []
    for y in range(size):
        row = bytearray([0])
        for x in range(size):
            v = ((x if cls % 2 else y) * 255 // size + 17 * i) % 256
            row += bytes((v if cls == 0 else 40, v if cls == 1 else 40 + i, v if cls >= 2 else 90))
        rows.append(bytes(row))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))


class Client:
    def __init__(self, port):
        self.port = port

    def call(self, method, path, body=None):
        """(status, parsed JSON or None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        try:
            return r.status, json.loads(raw) if raw else None
        except ValueError:
            return r.status, raw[:300].decode(errors="replace")

    def ok(self, method, path, body=None):
        status, got = self.call(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {got}")
        return got


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client, proc, log, timeout=900):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); its log: {log}")
        try:
            if client.call("GET", "/readyz")[0] == 200:
                return time.time() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout} s; its log: {log}")


def probabilities(response):
    """Per image, {label: probability} (None where the server sent null)."""
    return [{p["label"]: p["probability"] for p in image} for image in response["predictions"]]


def finite(probs):
    return all(p is not None and math.isfinite(p) for image in probs for p in image.values())


def worst_gap(a, b):
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)


def classify(client, head, composition, images):
    body = {"composition": composition, "head": head, "top_k": len(CLASSES),
            "images": [base64.b64encode(i).decode() for i in images]}
    t0 = time.perf_counter()
    got = client.ok("POST", "/classify", body)
    return probabilities(got), time.perf_counter() - t0


def learn(client, images, labels, epochs, timeout=1800):
    job = {"name": "few-shot", "objective": "few_shot", "task_vectors": ["tv1", "tv2"],
           "config": {"epochs": epochs, "batch_size": 8, "seed": 0, "augment": False},
           "tasks": [{"classes": CLASSES, "examples": [
               {"image": base64.b64encode(i).decode(), "label": c} for i, c in zip(images, labels)]}]}
    t0 = time.time()
    cid = client.ok("POST", "/compositions", job)["id"]
    while True:
        got = client.ok("GET", f"/compositions/{cid}")
        if got["status"] in TERMINAL or time.time() - t0 > timeout:
            return cid, got, time.time() - t0
        time.sleep(1)


def run_config(a, device, dtype, work, images, labels):
    port = free_port()
    data = os.path.join(work, f"data-{device}-{dtype}")
    log = os.path.join(a.out, f"serve-{device}-{dtype}.log")
    cmd = [a.bin, "serve", "--model", os.path.join(work, "model"), "--tv-dir",
           os.path.join(work, "lib"), "--device", device, "--dtype", dtype,
           "--listen", f"127.0.0.1:{port}", "--data-dir", data]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = Client(port)
    out = {"device": device, "dtype": dtype, "log": os.path.basename(log)}
    try:
        out["ready_s"] = wait_ready(client, proc, log)
        for name in ("tv1", "tv2"):
            client.ok("POST", "/task-vectors", {"name": name, "checkpoint": f"ft-{name}"})
        head = client.ok("POST", "/heads", {"classes": CLASSES})["id"]
        explicit = client.ok("POST", "/compositions", {
            "name": "explicit", "task_vectors": ["tv1", "tv2"], "coefficients": [0.3, 0.2]})["id"]
        large = client.ok("POST", "/compositions", {
            "name": "large", "task_vectors": ["tv1"], "coefficients": [100.0]})["id"]
        out["probs"], out["seconds"] = {}, {}
        for name, cid in (("base", "base"), ("explicit", explicit), ("large", large)):
            classify(client, head, cid, images[:1])  # composes and caches it first
            out["probs"][name], out["seconds"][name] = classify(client, head, cid, images)
        cid, job, out["seconds"]["learn"] = learn(client, images, labels, a.epochs)
        out["job"] = {k: job.get(k) for k in ("status", "summary", "error", "history")}
        if job["status"] == "succeeded":
            out["probs"]["learned"], out["seconds"]["learned"] = classify(client, head, cid, images)
        lat = [classify(client, head, "base", images[:1])[1] * 1e3 for _ in range(21)][1:]
        out["batch1_ms"] = {"median": statistics.median(lat), "min": min(lat)}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def checks(runs, tol):
    """Failures as text: non-finite outputs, a failed job, gaps beyond tol against runs[0]."""
    bad = []
    for r in runs:
        tag = f"{r['device']}:{r['dtype']}"
        if "error" in r:
            bad.append(f"{tag}: {r['error']}")
            continue
        for name, probs in r["probs"].items():
            if not finite(probs):
                bad.append(f"{tag}: {name} has non-finite probabilities")
        if r["job"]["status"] != "succeeded":
            bad.append(f"{tag}: the few-shot job ended {r['job']['status']}: {r['job'].get('error')}")
    ref = runs[0]
    for r in runs[1:]:
        if "error" in r or "error" in ref:
            continue
        r["gap"] = {}
        for name in ("base", "explicit", "large", "learned"):
            if name in r["probs"] and name in ref["probs"]:
                gap = worst_gap(ref["probs"][name], r["probs"][name])
                r["gap"][name] = gap
                if name in HELD and not gap <= tol:
                    bad.append(f"{r['device']}:{r['dtype']}: {name} differs from "
                               f"{ref['device']}:{ref['dtype']} by {gap:.4f} > {tol}")
    return bad


def job_line(job):
    s = job.get("summary") or {}
    if "metric" not in s:
        return ""
    return f" ({s['metric']} {s.get('before')} -> {s.get('after')}, {s.get('outcome')})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="the atlas-serve binary")
    ap.add_argument("--out", required=True, help="folder for service.json and the server logs")
    ap.add_argument("--configs", default="cpu:f32,cuda:f16",
                    help="device:dtype, comma-separated; the first is the reference")
    ap.add_argument("--vision", default="B/32", help="image tower: B/32, B/16, L/14 or tiny")
    ap.add_argument("--tol", type=float, default=0.02,
                    help="largest probability gap against the first configuration")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the few-shot job")
    ap.add_argument("--size", type=int, default=64, help="side of the synthetic images")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="atlas-service-")
    try:
        write = [a.bin, "bench", "write-model", "--vision", a.vision]
        subprocess.run(write + ["--out", os.path.join(work, "model")], check=True)
        for seed, name in ((1, "tv1"), (2, "tv2")):
            subprocess.run(write + ["--seed", str(seed), "--out",
                                    os.path.join(work, "lib", f"ft-{name}")], check=True)
        images = [png(a.size, c, i) for c in range(len(CLASSES)) for i in range(PER_CLASS)]
        labels = [c for c in range(len(CLASSES)) for _ in range(PER_CLASS)]
        runs = []
        for config in a.configs.split(","):
            device, dtype = config.split(":")
            print(f"== {device} {dtype}", flush=True)
            try:
                runs.append(run_config(a, device, dtype, work, images, labels))
            except Exception as e:  # noqa: BLE001 - recorded; the other configurations run
                runs.append({"device": device, "dtype": dtype, "error": str(e)})
        bad = checks(runs, a.tol)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(a.out, "service.json"), "w") as f:
        json.dump({"vision": a.vision, "tol": a.tol, "runs": runs, "failures": bad}, f, indent=1)
    for r in runs:
        if "error" in r:
            print(f"{r['device']}:{r['dtype']}: ERROR {r['error']}")
            continue
        print(f"{r['device']}:{r['dtype']}: ready {r['ready_s']:.1f} s, classify "
              + ", ".join(f"{k} {v:.3f} s" for k, v in r["seconds"].items())
              + f"; batch 1 over HTTP {r['batch1_ms']['median']:.1f} ms; job {r['job']['status']}"
              + job_line(r["job"])
              + (f"; gaps {', '.join(f'{k} {v:.2e}' for k, v in r['gap'].items())}" if "gap" in r else ""))
    print("\n".join(bad) if bad else f"all checks passed (tol {a.tol})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
