#!/usr/bin/env python3
"""The cost of the shared store: /classify on one replica over SQLite and over PostgreSQL, three
replicas over PostgreSQL, database round trips per request, job claim latency, and how long a
dead replica's job waits before another resumes it.

Starts everything itself: a PostgreSQL cluster (Debian's server binaries, a temporary directory,
a loopback port; as `nobody` under root) and `atlas-serve serve` processes over the tiny
fixture CLIP and its two task vectors (a model whose forward pass is short, so that the store's
share of a request shows). For each setting, c client threads (keep-alive connections) send
single-image /classify requests for one explicit composition, after a warm-up: served
requests/s, p50 and p99 latency, and atlas_db_queries_total's increase per request (the
background round trips of the same idle time, measured just before, subtracted). Three replicas
share this machine's cores with each other and with the load generator: they cannot be faster
than one, so the table gives the per-replica rate too.

    cargo build --release -p atlas-server
    python3 bench/replicas.py --bin target/release/atlas-serve --out bench/results/replicas-cpu.json

Standard library only; bench/results/replicas-cpu.md has the command and machine of the
committed figures.
"""
import argparse
import base64
import glob
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests/fixtures/tiny")
TVS = ["delta_c_openclip", "delta_a_openclip_with_proj"]
CLASSES = ["red", "green", "blue", "yellow"]


def tiny_png():
    """A 32x32 gradient PNG, standard library only."""
    import struct
    import zlib
    rows = b"".join(b"\0" + bytes(v for x in range(32) for v in (x * 8, y * 8, 100)) for y in range(32))
    chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def request(port, method, path, body=None, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else None
    c.request(method, path, data, {"Content-Type": "application/json"} if data else {})
    r = c.getresponse()
    text = r.read()
    c.close()
    return r.status, (json.loads(text) if text and text[:1] in b"{[" else text.decode())


def metric(port, name):
    _, text = request(port, "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class Postgres:
    def __init__(self, work):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not bins:
            sys.exit("install PostgreSQL's server binaries: apt-get install postgresql")
        self.bin, self.dir = bins[-1], os.path.join(work, "pg")
        os.makedirs(self.dir)
        self.owner = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if self.owner:
            shutil.chown(self.dir, "nobody")
        subprocess.run(self.owner + [f"{self.bin}/initdb", "-D", f"{self.dir}/data", "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL)
        self.port = free_port()
        self.proc = subprocess.Popen(self.owner + [f"{self.bin}/postgres", "-D", f"{self.dir}/data",
                                                   "-p", str(self.port), "-k", self.dir,
                                                   "-c", "listen_addresses=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while subprocess.run([f"{self.bin}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode:
            time.sleep(0.1)
        self.n = 0
        self.version = subprocess.run([f"{self.bin}/postgres", "--version"], capture_output=True,
                                      text=True).stdout.strip()

    def database(self):
        self.n += 1
        name = f"bench{self.n}"
        subprocess.run([f"{self.bin}/psql", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                        "-c", f"CREATE DATABASE {name}"], check=True)
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Replica:
    def __init__(self, args, work, name, url=None, blobs=None, extra=()):
        self.port = free_port()
        tvs = ",".join(os.path.join(FIX, t + ".safetensors") for t in TVS)
        cmd = [args.bin, "serve", "--listen", f"127.0.0.1:{self.port}", "--model", os.path.join(FIX, "clip"),
               "--store", "f32", "--tvs", tvs, "--data-dir", os.path.join(work, name), "--replica", name,
               *extra]
        if url:
            cmd += ["--database-url", url, "--blob-dir", blobs]
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), CANDLE_NUM_THREADS=str(args.threads))
        self.log = open(os.path.join(work, name + ".log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env)
        deadline = time.time() + 120
        while True:
            try:
                if request(self.port, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit(f"replica {name} did not become ready")
            time.sleep(0.1)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def load(ports, comp, threads, requests):
    """`threads` clients spread over `ports`, `requests` timed single-image requests in all."""
    body = json.dumps({"composition": comp, "classes": CLASSES,
                       "images": [base64.b64encode(tiny_png()).decode()]}).encode()
    lat, lock = [], threading.Lock()
    per = requests // threads

    def client(i):
        c = http.client.HTTPConnection("127.0.0.1", ports[i % len(ports)], timeout=60)
        mine = []
        for k in range(per + 1):
            t0 = time.perf_counter()
            c.request("POST", "/classify", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            assert r.status == 200, r.status
            if k:
                mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "wall_s": wall, "rps": len(lat) / wall,
            "p50_ms": 1e3 * lat[len(lat) // 2], "p99_ms": 1e3 * lat[int(len(lat) * 0.99)]}


def served(args, label, replicas):
    ports = [r.port for r in replicas]
    _, comp = request(ports[0], "POST", "/compositions", {"task_vectors": TVS, "coefficients": [0.3, 0.2]})
    out = []
    for threads in args.concurrency:
        load(ports, comp["id"], threads, threads * 5)  # warm-up: every replica caches it
        q0 = sum(metric(p, "atlas_db_queries_total") for p in ports)
        time.sleep(2)
        idle = sum(metric(p, "atlas_db_queries_total") for p in ports) - q0 - len(ports)
        q1 = sum(metric(p, "atlas_db_queries_total") for p in ports)
        r = load(ports, comp["id"], threads, args.requests)
        q2 = sum(metric(p, "atlas_db_queries_total") for p in ports)
        background = idle / 2 * r["wall_s"]
        trips = q2 - q1 - len(ports)  # less the second scrape's own job counts
        r.update(setting=label, replicas=len(ports), threads=threads,
                 per_replica_rps=r["rps"] / len(ports), db_round_trips=trips,
                 db_background_estimate=background,
                 db_round_trips_per_request=(trips - background) / r["requests"])
        print(f"{label:<28} c={threads:<3} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms  db trips {trips:.0f} (background ~{background:.1f})", flush=True)
        out.append(r)
    return out


def claim_latency(args, replica, n=5):
    """Time from a job's 202 to its status `running` (a worker claimed it), on an idle replica."""
    examples = [{"image": base64.b64encode(tiny_png()).decode(), "label": i % 4} for i in range(8)]
    body = {"objective": "few_shot", "task_vectors": TVS,
            "tasks": [{"classes": CLASSES, "examples": examples}], "config": {"epochs": 1, "batch_size": 4}}
    times = []
    for _ in range(n):
        code, job = request(replica.port, "POST", "/compositions", body)
        assert code == 202, job
        t0 = time.perf_counter()
        while True:
            _, c = request(replica.port, "GET", f"/compositions/{job['id']}")
            if c["status"] != "queued":
                times.append(time.perf_counter() - t0)
                break
            time.sleep(0.002)
        while request(replica.port, "GET", f"/compositions/{job['id']}")[1]["status"] == "running":
            time.sleep(0.05)
    return statistics.median(times)


def resume_wait(args, pg, work, lease_s):
    """A replica dies under a job; seconds until another replica resumes it."""
    url, blobs = pg.database(), os.path.join(work, f"blobs-resume-{lease_s}")
    a = Replica(args, work, f"ra{lease_s}", url, blobs, ["--job-lease-s", str(lease_s)])
    examples = [{"image": base64.b64encode(tiny_png()).decode(), "label": i % 4} for i in range(16)]
    body = {"objective": "few_shot", "task_vectors": TVS,
            "tasks": [{"classes": CLASSES, "examples": examples}], "config": {"epochs": 1000, "batch_size": 4}}
    code, job = request(a.port, "POST", "/compositions", body)
    assert code == 202, job
    while request(a.port, "GET", f"/compositions/{job['id']}")[1]["status"] != "running":
        time.sleep(0.05)
    b = Replica(args, work, f"rb{lease_s}", url, blobs, ["--job-lease-s", str(lease_s)])
    a.kill()
    t0 = time.perf_counter()
    while metric(b.port, 'atlas_job_claims_total{how="expired"}') < 1:
        time.sleep(0.05)
    waited = time.perf_counter() - t0
    request(b.port, "POST", f"/compositions/{job['id']}/cancel", {})
    b.kill()
    return waited


def machine():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "features": keep, "kernel": platform.release()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--out")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="atlas-bench-replicas-")
    os.chmod(work, 0o755)
    pg = Postgres(work)
    results = {"machine": machine(), "postgres": pg.version, "command": " ".join(sys.argv), "served": []}
    try:
        one = Replica(args, work, "sqlite")
        results["served"] += served(args, "1 replica, SQLite", [one])
        results["claim_latency_s_sqlite"] = claim_latency(args, one)
        one.kill()
        url, blobs = pg.database(), os.path.join(work, "blobs")
        one = Replica(args, work, "pg", url, blobs)
        results["served"] += served(args, "1 replica, PostgreSQL", [one])
        results["claim_latency_s_postgres"] = claim_latency(args, one)
        three = [one] + [Replica(args, work, f"pg{i}", url, blobs) for i in (2, 3)]
        results["served"] += served(args, "3 replicas, PostgreSQL", three)
        for r in three:
            r.kill()
        print(f"claim latency (median of 5): SQLite {1e3 * results['claim_latency_s_sqlite']:.1f} ms, "
              f"PostgreSQL {1e3 * results['claim_latency_s_postgres']:.1f} ms")
        results["resume_wait_s"] = {}
        for lease in (3, 30):
            w = resume_wait(args, pg, work, lease)
            results["resume_wait_s"][str(lease)] = w
            print(f"job_lease_s={lease}: a dead replica's job resumed elsewhere after {w:.1f} s")
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
