#!/usr/bin/env python3
"""Does work for one client stall another's? Latency of /classify on a cached composition while
other clients make the server build heads and compose models, against a running
`atlas-serve serve`. Standard library only.

Four phases, each `--requests` sequential single-image requests on one kept-alive connection
for a composition already resident (`A`, coefficient 0.01 on `--tv`) with a head already built:
  alone        nothing else runs;
  shared       a second client keeps classifying with another resident composition: the cost of
               sharing the engine and the cores, and the baseline for the next two;
  compose      the second client classifies with a new composition each time (a cache miss
               that composes the image tower, then a forward pass);
  heads        the second client classifies with a new head each time, of 90 classes × 10 long
               templates (built through the text tower, then a forward pass).
Prints one Markdown row per phase: p50, p99, max and how much background work finished.

    atlas-serve bench write-model --vision B/32 --out /tmp/iso/base --seed 0
    atlas-serve bench write-model --vision B/32 --out /tmp/iso/ft --seed 1
    atlas-serve task-vector build --base /tmp/iso/base --finetuned /tmp/iso/ft --name t1 \
        --out /tmp/iso/t1.safetensors
    atlas-serve serve --model /tmp/iso/base --tvs /tmp/iso/t1.safetensors --data-dir /tmp/iso/data
    python3 bench/serve_isolation.py --url http://127.0.0.1:8080 --tv t1
"""
import argparse
import base64
import http.client
import json
import statistics
import struct
import threading
import time
import urllib.parse
import zlib


def png(size, shade):
    """A size x size RGB PNG, built with zlib."""
    row = b"\x00" + bytes((shade, 255 - shade, (shade * 7) % 256)) * size
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(row * size, 6)) + chunk(b"IEND", b""))


class Client:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)

    def post(self, path, body):
        self.conn.request("POST", path, body=json.dumps(body).encode(),
                          headers={"content-type": "application/json"})
        r = self.conn.getresponse()
        raw = r.read()
        if r.status >= 300:
            raise RuntimeError(f"POST {path}: {r.status} {raw[:300]!r}")
        return json.loads(raw or b"null")


def composition(client, tv, coefficient):
    return client.post("/compositions", {"task_vectors": [tv], "coefficients": [coefficient]})["id"]


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
TEXTURES = ["plain", "checkered", "dotted"]


def background(url, tv, kind, stop, done):
    """Keeps the server busy: the same resident composition, or a new composition or a new
    head per request."""
    c = Client(url)
    resident = composition(c, tv, 0.02)
    image = base64.b64encode(png(224, 90)).decode()
    words = "a long description of a picture with many words in it " * 4
    i = 0
    while not stop.is_set():
        i += 1
        if kind == "shared":
            c.post("/classify", {"composition": resident, "classes": ["red", "blue"],
                                 "images": [image]})
        elif kind == "compose":
            cid = composition(c, tv, 0.01 + i * 1e-4)
            c.post("/classify", {"composition": cid, "classes": ["red", "blue"], "images": [image]})
        else:
            # Words of the demo vocabulary (the written model's tokenizer knows no others);
            # the templates make each head new.
            classes = [f"{c} {s} {t}" for c in COLOURS for s in SHAPES for t in TEXTURES]
            templates = [f"{i} {t} {words} {{}}" for t in range(10)]
            c.post("/classify", {"classes": classes, "templates": templates, "images": [image]})
        done[0] += 1


def phase(url, tv, name, cid, requests):
    c = Client(url)
    body = {"composition": cid, "classes": ["red", "blue"],
            "images": [base64.b64encode(png(224, 30)).decode()]}
    c.post("/classify", body)  # connection set-up
    stop, done = threading.Event(), [0]
    worker = None
    if name != "alone":
        worker = threading.Thread(target=background,
                                  args=(url, tv, name, stop, done))
        worker.start()
        time.sleep(0.5)
    lat = []
    for _ in range(requests):
        t = time.perf_counter()
        c.post("/classify", body)
        lat.append((time.perf_counter() - t) * 1000)
    stop.set()
    if worker:
        worker.join()
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"| {name} | {requests} | {statistics.median(lat):.1f} | {p99:.1f} | {lat[-1]:.1f} "
          f"| {done[0]} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--tv", required=True, help="a task vector in the server's library")
    ap.add_argument("--requests", type=int, default=100)
    a = ap.parse_args()
    c = Client(a.url)
    cid = composition(c, a.tv, 0.01)
    print("| phase | requests | p50 ms | p99 ms | max ms | background requests done |")
    print("|---|---|---|---|---|---|")
    for name in ("alone", "shared", "compose", "heads"):
        phase(a.url, a.tv, name, cid, a.requests)


if __name__ == "__main__":
    main()
