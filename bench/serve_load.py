#!/usr/bin/env python3
"""Served /classify throughput under concurrent load, next to the model's raw throughput.

For each concurrency c (default 1,2,4,8,16,32,64), c client threads (one keep-alive
http.client connection each) send single-image /classify requests for composition "base" over
loopback: one warm-up request per thread, then N = max(--min-requests, --per-thread * c) timed
requests shared among the threads. Per level: served images/s (timed requests / wall time),
p50 / p99 / mean latency, and from GET /metrics (deltas over the timed requests) the mean batch
the engine ran (atlas_batch_size _sum/_count) and the engine's busy time
(atlas_classify_batch_seconds_sum). The 1-minute load average is recorded before each level.

Right after each level, the raw throughput of the same image tower at the mean batch the server
ran (rounded): `atlas-serve bench classify --models M --dtypes T --device D --batches B` (the
server's --dtype and --device, default f32 on the CPU; random weights;
times do not depend on values), while the server idles (its CPU seconds meanwhile are recorded,
to show it does not compete). Figures seconds apart see the same foreign load on a shared
machine. Both run with the same CANDLE_NUM_THREADS and RAYON_NUM_THREADS (--threads); the load
generator's threads run on the same machine. Prints a table (concurrency, served img/s, mean
batch, raw img/s at that batch, served/raw, p50, p99) and writes everything as JSON (--out).
Standard library only.

    cargo build --release -p atlas-server
    target/release/atlas-serve bench write-model --vision B/32 --out <model dir>
    python3 bench/serve_load.py --bin target/release/atlas-serve --model <model dir> \\
        --threads 2 --out bench/results/serve-load-cpu/<name>.json

With --bin the script starts `atlas-serve serve --model <model dir>` itself (on --url's port,
a temporary data directory, default settings otherwise; extra flags in --serve-args) and
stops it at the end. Without --bin it drives a server already running at --url and skips the
raw figures unless --raw-bin is given. bench/results/serve-load-cpu.md has the exact command of
the committed results.
"""
import argparse
import base64
import http.client
import json
import os
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib


def png(size):
    """A size x size RGB PNG (a colour gradient), built with zlib."""
    rows = []
    for y in range(size):
        row = bytearray([0])
        for x in range(size):
            row += bytes((x * 255 // size, y * 255 // size, (x + y) * 127 // size))
        rows.append(bytes(row))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))


class Client:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.conn = None

    def call(self, method, path, body=None):
        """(status, body bytes); reconnects once if a kept-alive connection was closed. `body`:
        a JSON value, or bytes already encoded."""
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            try:
                self.conn.request(method, path, body=data,
                                  headers={"content-type": "application/json"})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise

    def json(self, method, path, body=None):
        status, raw = self.call(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {raw[:300]!r}")
        return json.loads(raw or b"null")


def metrics(client):
    status, raw = client.call("GET", "/metrics")
    out = {}
    for line in raw.decode().splitlines():
        if line.startswith("atlas_") and " " in line:
            name, value = line.rsplit(" ", 1)
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def level(url, body, c, n, server_pid=None):
    """One concurrency level: warm-up, then n timed requests from c threads."""
    body = json.dumps(body).encode()  # once, not per request: the client shares the cores
    clients = [Client(url) for _ in range(c)]
    lat, errors, lock = [], [], threading.Lock()
    left = [n]
    ready, go = threading.Barrier(c + 1), threading.Barrier(c + 1)

    def worker(cl):
        try:
            cl.call("POST", "/classify", body)  # warm-up (and connection set-up)
        except Exception:  # noqa: BLE001 - the timed requests will report it
            cl.conn = None
        ready.wait()
        go.wait()
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            s = time.perf_counter()
            try:
                status, raw = cl.call("POST", "/classify", body)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                status, raw = -1, str(e).encode()
            ms = (time.perf_counter() - s) * 1e3
            with lock:
                if status == 200:
                    lat.append(ms)
                else:
                    errors.append(f"{status} {raw[:200]!r}")

    threads = [threading.Thread(target=worker, args=(cl,), daemon=True) for cl in clients]
    for t in threads:
        t.start()
    ready.wait()
    probe = Client(url)
    before, load1 = metrics(probe), os.getloadavg()[0]
    cpu0, me0 = server_pid and cpu_seconds(server_pid), os.times()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1, me1 = server_pid and cpu_seconds(server_pid), os.times()
    after = metrics(probe)
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)
    batches, busy = d("atlas_batch_size_count"), d("atlas_classify_batch_seconds_sum")
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None
    return {
        "concurrency": c, "requests": n, "ok": len(lat), "errors": len(errors),
        "error_samples": errors[:3], "wall_s": wall, "img_per_s": len(lat) / wall,
        "p50_ms": p(0.50), "p99_ms": p(0.99), "mean_ms": statistics.mean(lat) if lat else None,
        "batches": batches, "images": d("atlas_classified_images_total"),
        "mean_batch": d("atlas_batch_size_sum") / batches if batches else None,
        # Cumulative: batches of at most `le` images.
        "batches_le": {k.split('"')[1]: d(k) for k in after if k.startswith("atlas_batch_size_bucket")},
        "engine_busy_s": busy, "engine_busy_frac": busy / wall,
        "engine_img_per_s": d("atlas_classified_images_total") / busy if busy else None,
        "load1_before": load1,
        # CPU seconds over the timed requests: the whole server process (engine included) and
        # this load generator (it runs on the same cores).
        "server_cpu_s": cpu1 - cpu0 if cpu0 and cpu1 else None,
        "client_cpu_s": (me1.user + me1.system) - (me0.user + me0.system),
    }


def wait_ready(url, proc, log, timeout=600):
    cl, t0 = Client(url), time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}); its log: {log}")
        try:
            if cl.call("GET", "/readyz")[0] == 200:
                return time.time() - t0
        except OSError:
            pass
        cl.conn = None
        time.sleep(0.5)
    sys.exit(f"the server was not ready within {timeout} s; its log: {log}")


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def raw_figure(bin_path, model, batch, env, a, server_pid):
    """`bench classify` at one batch size; the server (if any) idles meanwhile."""
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    cmd = [bin_path, "bench", "classify", "--models", model, "--dtypes", a.dtype,
           "--device", a.device, "--batches", str(batch), "--iters", str(a.raw_iters),
           "--max-seconds", str(a.raw_max_seconds), "--out", path]
    load1, cpu0 = os.getloadavg()[0], cpu_seconds(server_pid) if server_pid else None
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    cpu1 = cpu_seconds(server_pid) if server_pid else None
    rec = [json.loads(line) for line in open(path)][-1]
    os.unlink(path)
    rec["load1_before"] = load1
    rec["server_cpu_s_meanwhile"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return ["bench"] + cmd[2:-2], rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--bin", help="atlas-serve binary: start the server, and the raw figures")
    ap.add_argument("--raw-bin", help="atlas-serve binary for the raw figures only")
    ap.add_argument("--model", help="model directory (bench write-model), with --bin")
    ap.add_argument("--vision", default="B/32", help="the image tower's name for bench classify")
    ap.add_argument("--serve-args", default="", help="extra flags for serve (one string)")
    ap.add_argument("--device", default="cpu", help="device of the server and the raw figures")
    ap.add_argument("--dtype", default="f32", help="dtype of the server and the raw figures")
    ap.add_argument("--threads", type=int, help="CANDLE_NUM_THREADS and RAYON_NUM_THREADS")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--per-thread", type=int, default=4)
    ap.add_argument("--image", help="an image file (default: a generated PNG)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--raw-iters", type=int, default=3)
    ap.add_argument("--raw-max-seconds", type=float, default=20)
    ap.add_argument("--no-raw", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()

    env = dict(os.environ)
    if a.threads:
        env["CANDLE_NUM_THREADS"] = env["RAYON_NUM_THREADS"] = str(a.threads)
    threads = {k: env.get(k, "unset") for k in ("CANDLE_NUM_THREADS", "RAYON_NUM_THREADS")}
    proc, log, started, data = None, None, {}, None
    if a.bin:
        if not a.model:
            sys.exit("--bin needs --model")
        data = tempfile.mkdtemp(prefix="serve-load-")
        log = os.path.join(data, "serve.log")
        listen = urllib.parse.urlparse(a.url).netloc
        cmd = [a.bin, "serve", "--model", a.model, "--listen", listen, "--data-dir",
               os.path.join(data, "data"), "--device", a.device, "--dtype", a.dtype]
        cmd += shlex.split(a.serve_args)
        proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        started = {"serve_flags": ["--listen", listen, "--data-dir", "<tmp>"] + cmd[8:]}
        started["ready_s"] = wait_ready(a.url, proc, log)
    else:
        wait_ready(a.url, None, None, timeout=10)

    image = open(a.image, "rb").read() if a.image else png(a.image_size)
    client = Client(a.url)
    head = client.json("POST", "/heads", {"classes": ["circle", "square", "triangle", "cross"]})["id"]
    body = {"composition": "base", "head": head,
            "images": [base64.b64encode(image).decode()], "top_k": 1}
    rows, raw_cmd = [], None
    raw_bin = None if a.no_raw else (a.raw_bin or a.bin)
    print(f"threads {threads}", flush=True)
    try:
        client.json("POST", "/classify", body)  # composes (caches) the base tower
        for c in [int(x) for x in a.concurrency.split(",")]:
            n = max(a.min_requests, a.per_thread * c)
            r = level(a.url, body, c, n, proc and proc.pid)
            line = (f"c={c:<3} n={n:<4} {r['img_per_s']:7.2f} img/s  batch {r['mean_batch'] or 0:5.2f}"
                    f"  p50 {r['p50_ms'] or 0:8.1f} ms  p99 {r['p99_ms'] or 0:8.1f} ms"
                    f"  engine busy {r['engine_busy_frac']:.0%}  errors {r['errors']}"
                    f"  load {r['load1_before']:.2f}  cpu s: server {r['server_cpu_s'] or 0:.1f}"
                    f" client {r['client_cpu_s']:.1f}\n      batches of at most n images:"
                    f" {' '.join(f'{k}:{v:g}' for k, v in r['batches_le'].items())}")
            print(line, flush=True)
            r["raw_batch"] = max(1, round(r["mean_batch"])) if r["mean_batch"] else None
            r["raw"] = None
            if raw_bin and r["raw_batch"]:
                # Right after the level, so both figures see the same foreign load.
                raw_cmd, r["raw"] = raw_figure(raw_bin, a.vision, r["raw_batch"], env, a,
                                               proc and proc.pid)
            rr = r["raw"] or {}
            r["raw_img_per_s"] = rr.get("img_per_s")
            r["served_over_raw"] = rr.get("img_per_s") and r["img_per_s"] / rr["img_per_s"]
            if rr:
                print(f"      raw b={r['raw_batch']:<3} {rr.get('img_per_s', 0):7.2f} img/s"
                      f"  served/raw {r['served_over_raw']:.2f}  load {rr['load1_before']:.2f}"
                      f"  server cpu meanwhile {rr['server_cpu_s_meanwhile']} s", flush=True)
            rows.append(r)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(data, ignore_errors=True)

    f = lambda x, spec: "-" if x is None else format(x, spec)
    print()
    print("| concurrency | served img/s | mean batch | raw img/s at that batch | served / raw "
          "| p50 ms | p99 ms | engine busy | load (1 min) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['img_per_s']:.2f} | {f(r['mean_batch'], '.2f')} "
              f"| {f(r['raw_img_per_s'], '.2f')} (b={r['raw_batch']}) "
              f"| {f(r['served_over_raw'], '.2f')} | {f(r['p50_ms'], '.0f')} "
              f"| {f(r['p99_ms'], '.0f')} | {r['engine_busy_frac']:.0%} | {r['load1_before']:.2f} |")
    if a.out:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                    if l.startswith("model name")), "unknown")
        doc = {
            "benchmark": "serve-load", "vision": a.vision, "threads": threads,
            "machine": {"cpu": cpu, "cores": os.cpu_count()},
            "script_args": {k: v for k, v in vars(a).items() if k not in ("bin", "raw_bin", "model", "out")},
            "server": started, "raw_command": raw_cmd, "levels": rows,
            "load1_end": os.getloadavg()[0],
        }
        with open(a.out, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
