"""Live check of the dashboard and the alert rules against a real server and a real Prometheus.

Starts `atlas-serve serve` on loopback over the tiny CLIP test fixture and two task vectors
(they load in a second; the demo world takes minutes to train in a debug build), and Prometheus
with deploy/prometheus/prometheus.yml (the target replaced by that server, scraping every 2 s).
Drives some traffic, waits for scrapes, then evaluates every PromQL expression of
deploy/grafana/atlas-serve.json (panel and variable queries), of the alert rules and of the
autoscalers (the KEDA ScaledObject's Prometheus triggers and the prometheus-adapter rules, their
templates filled as the adapter would) through Prometheus' HTTP API. Fails when one does not evaluate, when one names a metric that the
server's /metrics does not export, when the traffic left no trace where it must, or when a
rule's evaluation is unhealthy.

    python3 .ci/deploy/live_check.py --server target/debug/atlas-serve --prometheus PATH
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/atlas-serve.json"
PROM_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
COMPONENTS = ROOT / "deploy/kubernetes/components"
ADAPTER_RULES = COMPONENTS / "autoscaling-hpa/prometheus-adapter.yaml"
FIXTURES = ROOT / "tests/fixtures"
JOB = "atlas-serve"
SCRAPE = 2  # seconds between scrapes and rule evaluations in the check
# The server runs with API keys, as in the deployment (a Secret there); every request sends it.
API_KEY = "live-check-key-0123456789"
# What Grafana would put in for its variables: every instance of the job, and windows that hold
# several scrapes of a run that lasts a minute or two.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "10s",
    "$__range": "5m",
    "${job}": JOB,
    "$job": JOB,
    "${instance}": ".*",
    "$instance": ".*",
}
# Series that Prometheus makes itself, not the server.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"}


def log(msg: str) -> None:
    print(f"live-check: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, timeout=30.0):
    """(status, parsed JSON or text) of one request; HTTP errors are answers, not exceptions."""
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    headers["authorization"] = f"Bearer {API_KEY}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(what: str, probe, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"live-check: {what} did not happen within {timeout:.0f} s")


# --------------------------------------------------------------------------------- processes


class Processes:
    """Children started by the check, stopped (and their logs shown on failure) at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.children = []

    def start(self, name: str, argv, env=None) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.log", "w")
        p = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.children.append((name, p))
        return p

    def check_alive(self) -> None:
        for name, p in self.children:
            if p.poll() is not None:
                self.show_logs()
                raise SystemExit(f"live-check: {name} exited with {p.returncode}")

    def show_logs(self) -> None:
        for name, _ in self.children:
            lines = (self.workdir / f"{name}.log").read_text(errors="replace").splitlines()
            if len(lines) > 45:  # the start (a start-up error) and the end
                lines = lines[:15] + ["[...]"] + lines[-30:]
            print(f"----- the {name} log -----")
            print("\n".join(lines))

    def stop(self) -> None:
        for _, p in reversed(self.children):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def start_server(procs: Processes, binary: str, port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    data = procs.workdir / "data"
    data.mkdir()
    env = dict(os.environ)
    # Everything the server writes stays in the check's temporary folder.
    env.update(
        {
            "ATLAS_CACHE": str(procs.workdir / "cache"),
            "ATLAS_DATA_DIR": str(data),
            "HF_HOME": str(procs.workdir / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HOME": str(procs.workdir),
            "ATLAS_API_KEYS": API_KEY,
        }
    )
    tiny = FIXTURES / "tiny"
    tvs = [tiny / "delta_c_openclip.safetensors", tiny / "delta_a_openclip_with_proj.safetensors"]
    argv = [binary, "serve", "--listen", f"127.0.0.1:{port}", "--model", str(tiny / "clip")]
    argv += ["--store", "f32", "--tvs", ",".join(str(t) for t in tvs)]
    log(f"starting {' '.join(argv[1:])}")
    procs.start("server", argv, env)

    def ready():
        procs.check_alive()
        return http("GET", f"{base}/readyz", timeout=2)[0] == 200

    # As the start-up probe does: the server answers /healthz at once, /readyz once the
    # backbone and the library are loaded.
    wait_for("the server ready (/readyz)", ready, 120)
    return base


def start_prometheus(procs: Processes, binary: str, port: int, target: str) -> str:
    """Prometheus with the shipped configuration, only faster and aimed at the local server."""
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE}s"
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    if len(jobs) != 1:
        raise SystemExit(f"live-check: {PROM_CONFIG} has no single job {JOB}")
    jobs[0]["scrape_timeout"] = f"{SCRAPE}s"
    jobs[0]["static_configs"] = [{"targets": [target]}]
    config["rule_files"] = [str(PROM_CONFIG.parent / f) for f in config.get("rule_files", [])]
    path = procs.workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    procs.start(
        "prometheus",
        [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={procs.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
    )
    base = f"http://127.0.0.1:{port}"

    def ready():
        procs.check_alive()
        return http("GET", f"{base}/-/ready", timeout=2)[0] == 200

    wait_for("Prometheus ready", ready, 60)
    return base


# ------------------------------------------------------------------------------------ traffic


def traffic(base: str) -> list[str]:
    """Some of every kind of request that the dashboard shows. Request shapes follow
    openapi.yaml; this is the one place to change when they change. Returns what went wrong."""
    problems = []

    def expect(what, got, *want):
        if got[0] not in want:
            problems.append(f"{what}: HTTP {got[0]} (expected {want}): {str(got[1])[:300]}")
        return got[1] if isinstance(got[1], dict) else {}

    images = [
        base64.b64encode((FIXTURES / "preprocess" / n).read_bytes()).decode()
        for n in ("gradient_50x37.png", "palette_40x30.png", "photo_41x64.jpg", "tiny_20x30.png")
    ]
    classes = ["red circle", "blue square", "green forest", "dog toy"]
    expect("GET /healthz", http("GET", f"{base}/healthz"), 200)
    expect("GET /readyz", http("GET", f"{base}/readyz"), 200)
    tvs = expect("GET /task-vectors", http("GET", f"{base}/task-vectors"), 200)
    names = [t["name"] for t in tvs.get("task_vectors", [])]
    for i in range(6):
        expect(
            "POST /classify",
            http("POST", f"{base}/classify", {"classes": classes, "images": images[: 1 + i % 4]}),
            200,
        )
    expect(
        "POST /classify (bad image)",
        http("POST", f"{base}/classify", {"classes": classes, "images": ["%%%"]}),
        400,
    )
    expect("GET /no-such-route", http("GET", f"{base}/no-such-route"), 404)
    if len(names) < 2:
        problems.append(f"GET /task-vectors listed {names}: no composition or job was tried")
        return problems
    comp = expect(
        "POST /compositions (explicit)",
        http(
            "POST", f"{base}/compositions", {"task_vectors": names[:2], "coefficients": [0.3, 0.5]}
        ),
        200,
        201,
    )
    if "id" in comp:
        for _ in range(3):  # a miss, then hits
            expect(
                "POST /classify (composition)",
                http(
                    "POST",
                    f"{base}/classify",
                    {"composition": comp["id"], "classes": classes, "images": images},
                ),
                200,
            )
    examples = [{"image": images[i % 4], "label": i % 4} for i in range(8)]
    job = expect(
        "POST /compositions (learn)",
        http(
            "POST",
            f"{base}/compositions",
            {
                "objective": "few_shot",
                "task_vectors": names[:2],
                "tasks": [{"classes": classes, "examples": examples}],
                "config": {"epochs": 2, "batch_size": 4},
            },
        ),
        200,
        201,
        202,
    )
    if "id" in job:
        url = f"{base}/compositions/{urllib.parse.quote(job['id'])}"
        state = {}

        def finished():
            nonlocal state
            state = http("GET", url)[1]
            return isinstance(state, dict) and state.get("status") in (
                "succeeded",
                "failed",
                "cancelled",
            )

        wait_for("the learning job finishing", finished, 300)
        if state.get("status") != "succeeded":
            problems.append(f"learning job ended {state.get('status')}: {state}")
    return problems


# ---------------------------------------------------------------------------- expressions


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        query = v.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)\s*", query or "")
        if not m:
            raise SystemExit(f"live-check: variable {v.get('name')}: cannot check {query!r}")
        # label_values(selector, label) lists the label's values over the selector's series.
        out.append((f"variable ${v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def rule_expressions() -> list[tuple[str, str]]:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    out = []
    for f in config.get("rule_files", []):
        for g in yaml.safe_load((PROM_CONFIG.parent / f).read_text())["groups"]:
            for r in g["rules"]:
                out.append((f"rule {r.get('alert') or r.get('record')}", r["expr"]))
    return out


def adapter_query(rule: dict, job: str) -> str:
    """A prometheus-adapter rule's metricsQuery as the adapter sends it for the job's series:
    <<.Series>> is the metric of the seriesQuery, <<.LabelMatchers>> the job (the namespace and
    pod matchers that the adapter adds in a cluster select nothing on loopback), <<.GroupBy>>
    the pod."""
    series = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)", rule["seriesQuery"]).group(1)
    q = rule["metricsQuery"]
    for k, v in {
        "<<.Series>>": series,
        "<<.LabelMatchers>>": f'job="{job}"',
        "<<.GroupBy>>": "pod",
    }.items():
        q = q.replace(k, v)
    if "<<" in q:
        raise ValueError(f"unknown adapter template in {q!r}")
    return q


def autoscaler_expressions() -> list[tuple[str, str]]:
    """The queries the autoscalers send to Prometheus: each prometheus trigger of a KEDA
    ScaledObject in the components, and each prometheus-adapter rule."""
    out = []
    for path in sorted(COMPONENTS.glob("*/*.yaml")):
        for o in yaml.safe_load_all(path.read_text()):
            if not o or o.get("kind") != "ScaledObject":
                continue
            for t in o["spec"]["triggers"]:
                if t["type"] == "prometheus":
                    name = f"{o['metadata']['name']}/{t.get('name', '')}"
                    out.append((f"autoscaler ScaledObject {name}", t["metadata"]["query"]))
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    for kind in ("custom", "external"):
        for r in rules.get(kind, []):
            name = r.get("name", {}).get("as") or r["seriesQuery"].split("{")[0]
            out.append((f"autoscaler prometheus-adapter {kind} {name}", adapter_query(r, JOB)))
    return out


def substitute(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
    "start",
    "end",
}


def metric_names(expr: str) -> set[str]:
    """Metric names that a PromQL expression selects: identifiers left once strings, label
    matchers, grouping clauses, ranges and function calls are taken out."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        rest = s[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the tail of a number such as 1e3
        names.add(word)
    return names


def exported_names(base: str) -> set[str]:
    status, text = http("GET", f"{base}/metrics")
    if status != 200:
        raise SystemExit(f"live-check: GET /metrics answered {status}")
    names = set()
    for line in str(text).splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names


# What the traffic must show once scraped: the dashboard's data is there, not just its names.
EXPECTED = [
    ('atlas_ready{job="atlas-serve"} == 1', "the server reports ready"),
    ('sum(atlas_classified_images_total{job="atlas-serve"}) >= 22', "22 images classified"),
    (
        'sum(atlas_http_requests_total{job="atlas-serve", route="/compositions/{id}"}) > 0',
        "requests counted under the route template",
    ),
    ('sum(atlas_http_requests_total{job="atlas-serve", status="400"}) > 0', "the 400 counted"),
    ('sum(atlas_http_requests_total{job="atlas-serve", status="404"}) > 0', "the 404 counted"),
    ('sum(atlas_http_request_duration_seconds_count{job="atlas-serve"}) > 0', "latencies"),
    ('sum(atlas_batch_size_count{job="atlas-serve"}) > 0', "engine batches"),
    ('sum(atlas_cache_misses_total{job="atlas-serve"}) > 0', "a composition on a cache miss"),
    ('sum(atlas_cache_hits_total{job="atlas-serve"}) > 0', "cache hits"),
    ('sum(atlas_compose_seconds_count{job="atlas-serve"}) > 0', "compose time"),
    ('sum(atlas_jobs{job="atlas-serve", state="succeeded"}) >= 1', "the job succeeded"),
    ('sum(atlas_job_duration_seconds_count{job="atlas-serve"}) >= 1', "job duration"),
    ('sum(atlas_learning_step_seconds_count{job="atlas-serve"}) > 0', "learning steps"),
    ('sum(atlas_prediction_entropy_count{job="atlas-serve"}) > 0', "prediction entropy"),
    ('sum(atlas_prediction_confidence_count{job="atlas-serve"}) > 0', "prediction confidence"),
    ('sum(atlas_memory_bytes{job="atlas-serve", kind="backbone"}) > 0', "backbone memory"),
    ('sum(process_resident_memory_bytes{job="atlas-serve"}) > 0', "process memory"),
]


def has_data(result) -> bool:
    """Some series with a number (a histogram quantile over no observations is NaN)."""
    for r in result or []:
        value = r.get("value", [0, "NaN"])[1]
        if value not in ("NaN", "+Inf", "-Inf"):
            return True
    return False


def query(prom: str, expr: str):
    status, body = http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
        err = body.get("error") if isinstance(body, dict) else body
        return None, f"HTTP {status}: {err}"
    return body["data"]["result"], None


# ------------------------------------------------------------------------------------- main


def drive(server: str, prom: str) -> list[str]:
    """The traffic, twice, once Prometheus has a sample from before it."""
    wait_for(
        "a scrape of the server",
        lambda: has_data(query(prom, f'up{{job="{JOB}"}} == 1')[0]),
        30,
    )
    problems = []
    # Twice, with scrapes in between: series with labels (route, status, objective) appear on
    # their first event, and only a second one gives them a rate.
    for n in (1, 2):
        t0 = time.monotonic()
        problems += [f"traffic: {p}" for p in traffic(server)]
        log(f"traffic round {n} sent in {time.monotonic() - t0:.1f} s")
        time.sleep(3 * SCRAPE)
    return problems


def check_expressions(prom: str, exported: set[str]) -> list[str]:
    """Every dashboard and rule expression evaluates and names only exported metrics."""
    problems = []
    missing = {}
    empty = []
    scaling = autoscaler_expressions()
    exprs = dashboard_expressions() + rule_expressions() + scaling
    for where, expr in exprs:
        try:
            promql = substitute(expr)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        result, err = query(prom, promql)
        if err:
            problems.append(f"{where}: does not evaluate: {err}\n    {promql}")
            continue
        absent = sorted(metric_names(promql) - SYNTHETIC - exported)
        for name in absent:
            missing.setdefault(name, []).append(where)
        if not has_data(result) and where.startswith("autoscaler "):
            # An autoscaler without a value does not scale (prometheus-adapter answers an
            # error): its series exist from the server's start, with zero values.
            problems.append(f"{where}: no value\n    {promql}")
        elif not has_data(result) and not absent and not where.startswith("rule "):
            empty.append(where)
    for name, wheres in sorted(missing.items()):
        used = ", ".join(sorted(set(wheres)))
        problems.append(f"metric {name} is not exported by the server; used by {used}")
    rules = len(rule_expressions())
    log(
        f"evaluated {len(exprs)} expressions ({len(exprs) - rules - len(scaling)} from the "
        f"dashboard, {rules} from the rules, {len(scaling)} from the autoscalers)"
    )
    if empty:
        log(
            f"{len(empty)} dashboard queries have no data (no such event in the traffic, "
            f"e.g. 5xx or evictions): " + "; ".join(empty)
        )
    return problems


def check_expected(prom: str) -> list[str]:
    problems = []
    for expr, what in EXPECTED:
        result, err = query(prom, expr)
        if err or not has_data(result):
            problems.append(f"after the traffic, expected {what}: {expr} ({err or 'no'})")
    return problems


def check_rule_health(prom: str) -> list[str]:
    """Prometheus evaluated the rules itself as well: all loaded, every one healthy."""
    status, body = http("GET", f"{prom}/api/v1/rules")
    rules = [r for g in body["data"]["groups"] for r in g["rules"]] if status == 200 else []
    problems = [
        f"rule {r.get('name')}: health {r.get('health')}: {r.get('lastError')}"
        for r in rules
        if r.get("health") != "ok"
    ]
    if len(rules) != len(rule_expressions()):
        problems.append(f"Prometheus loaded {len(rules)} rules of {len(rule_expressions())}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="the atlas-serve binary")
    ap.add_argument("--prometheus", required=True, help="the prometheus binary")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()
    # A CI time-out sends SIGTERM: stop the children on the way out too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    workdir = Path(tempfile.mkdtemp(prefix="atlas-live-check-"))
    procs = Processes(workdir)
    failures = []
    try:
        server = start_server(procs, a.server, free_port())
        prom = start_prometheus(procs, a.prometheus, free_port(), server.removeprefix("http://"))
        failures += drive(server, prom)
        exported = exported_names(server)
        log(f"the server exports {len(exported)} series names")
        failures += check_expressions(prom, exported)
        failures += check_expected(prom)
        failures += check_rule_health(prom)
    finally:
        procs.stop()
        if failures:
            procs.show_logs()
        if a.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for f in failures:
        print(f"live-check: FAIL {f}")
    print(f"live-check: {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
