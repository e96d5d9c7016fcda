"""Checks of the rendered Kubernetes manifests that a schema cannot make: that the objects refer
to each other correctly and that the deployment keeps the promises of the README (security
context, probes, one replica, a GPU only in the GPU overlay). Also validates the Prometheus
Operator objects against the operator's CRD schemas, which kubernetes-validate does not have.

    python3 .ci/deploy/manifest_check.py gpu rendered-gpu.yaml cpu rendered-cpu.yaml
"""

import sys
import tomllib
from pathlib import Path

import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring

DEFAULTS = Path(__file__).resolve().parents[2] / "config/default.toml"
# ATLAS_* variables that are not `serve` settings: the demo world's cache root, the config file.
OTHER_VARS = {"ATLAS_CACHE", "ATLAS_CONFIG"}
PORT = "http"
STARTUP_BUDGET_S = 600  # the backbone download and the demo world build take minutes


class Problems(list):
    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


def by_kind(objs, kind):
    return [o for o in objs if o.get("kind") == kind]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_crds(objs, p: Problems) -> None:
    """The operator's CRD schemas, and no field they do not know (a round trip through the
    generated models loses unknown fields)."""
    for kind, model in (
        ("ServiceMonitor", monitoring.ServiceMonitor),
        ("PrometheusRule", monitoring.PrometheusRule),
    ):
        found = by_kind(objs, kind)
        p.check(len(found) == 1, f"expected one {kind}, found {len(found)}")
        for o in found:
            try:
                back = model.model_validate(o).model_dump(
                    by_alias=True, exclude_unset=True, mode="json"
                )
            except Exception as e:  # pydantic's ValidationError names the field
                p.append(f"{kind} {o['metadata']['name']}: {e}")
                continue
            p.check(back == o, f"{kind} {o['metadata']['name']}: fields the CRD does not know")


def check_settings(objs, containers, p: Problems) -> None:
    """Every ATLAS_* variable the pod gets names a setting of config/default.toml, the server's
    list of its settings (ATLAS_<KEY>): a misspelt or retired one would be ignored silently."""
    if not DEFAULTS.exists():
        p.append(f"{DEFAULTS.name} not found: cannot check the settings")
        return
    known = {f"ATLAS_{k.upper()}" for k in tomllib.loads(DEFAULTS.read_text())} | OTHER_VARS
    names = [k for o in by_kind(objs, "ConfigMap") for k in o.get("data", {})]
    names += [e["name"] for c in containers for e in c.get("env", [])]
    for n in names:
        ok = not n.startswith("ATLAS_") or n in known
        p.check(ok, f"{n} is not a setting of {DEFAULTS.name}")


def check_container(name: str, c: dict, p: Problems) -> None:
    sc = c.get("securityContext", {})
    p.check(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation")
    p.check(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem")
    p.check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{name}: capabilities")
    p.check(sc.get("privileged") in (None, False), f"{name}: privileged")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            p.check(r in res.get(part, {}), f"{name}: no {r} {part[:-1]}")


def check_server(c: dict, p: Problems) -> None:
    ports = {q.get("name"): q for q in c.get("ports", [])}
    p.check(PORT in ports, f"container has no port named {PORT}")
    probes = {k: c.get(k, {}) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    want = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for k, path in want.items():
        get = probes[k].get("httpGet", {})
        p.check(
            get.get("path") == path and get.get("port") == PORT,
            f"{k}: expected GET {path} on port {PORT}, got {get}",
        )
    s = probes["startupProbe"]
    budget = s.get("periodSeconds", 10) * s.get("failureThreshold", 3)
    p.check(budget >= STARTUP_BUDGET_S, f"startupProbe allows {budget} s, under {STARTUP_BUDGET_S}")
    secret_refs = [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    p.check(
        any(e["name"] == "ATLAS_API_KEYS" for e in secret_refs),
        "API keys do not come from a Secret",
    )
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    p.check({"/data", "/cache"} <= mounts, f"/data and /cache not both mounted: {mounts}")


def check_overlay(variant: str, objs: list, p: Problems) -> None:
    p.check(
        not by_kind(objs, "HorizontalPodAutoscaler"),
        "an HPA, but replicas cannot share the embedded store",
    )
    deps = by_kind(objs, "Deployment")
    p.check(len(deps) == 1, f"expected one Deployment, found {len(deps)}")
    if not deps:
        return
    d = deps[0]
    spec = d["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    p.check(spec.get("replicas") == 1, "replicas must stay 1 (embedded SQLite store)")
    p.check(
        spec.get("strategy", {}).get("type") == "Recreate",
        "the ReadWriteOnce volume needs the Recreate strategy",
    )
    p.check(selects(spec["selector"]["matchLabels"], labels), "selector misses the pod")
    psc = pod.get("securityContext", {})
    p.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, "pod runs as root")
    containers = pod.get("containers", [])
    for c in containers + pod.get("initContainers", []):
        check_container(c["name"], c, p)
    server = [c for c in containers if c["name"] == "atlas-serve"]
    p.check(len(server) == 1, "no container atlas-serve")
    if server:
        check_server(server[0], p)

    # References between the objects.
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for c in containers + pod.get("initContainers", []):
        for ref in c.get("envFrom", []):
            if "configMapRef" in ref:
                p.check(
                    ("ConfigMap", ref["configMapRef"]["name"]) in names,
                    f"ConfigMap {ref['configMapRef']['name']} is not rendered",
                )
    for v in pod.get("volumes", []):
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            p.check(("PersistentVolumeClaim", claim) in names, f"PVC {claim} is not rendered")
    services = by_kind(objs, "Service")
    p.check(len(services) == 1, f"expected one Service, found {len(services)}")
    for s in services:
        p.check(selects(s["spec"]["selector"], labels), "the Service selects no pod")
        p.check(
            any(q.get("targetPort") == PORT and q.get("name") == PORT for q in s["spec"]["ports"]),
            f"the Service has no port {PORT}",
        )
        for m in by_kind(objs, "ServiceMonitor"):
            p.check(
                selects(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]),
                "the ServiceMonitor selects no Service",
            )
            p.check(
                all(e.get("port") == PORT for e in m["spec"]["endpoints"]),
                f"the ServiceMonitor scrapes another port than {PORT}",
            )
    for b in by_kind(objs, "PodDisruptionBudget"):
        p.check(selects(b["spec"]["selector"]["matchLabels"], labels), "the PDB selects no pod")
    p.check(len(by_kind(objs, "PodDisruptionBudget")) == 1, "no PodDisruptionBudget")
    check_crds(objs, p)
    check_settings(objs, containers, p)

    # What differs between the overlays.
    gpus = [
        c.get("resources", {}).get(part, {}).get("nvidia.com/gpu")
        for c in containers
        for part in ("requests", "limits")
    ]
    image = server[0]["image"] if server else ""
    if variant == "gpu":
        p.check(
            server and server[0]["resources"]["limits"].get("nvidia.com/gpu") == 1,
            "the GPU overlay does not ask for nvidia.com/gpu: 1",
        )
        p.check("cuda" in image, f"the GPU overlay runs a non-CUDA image {image}")
    else:
        p.check(not any(gpus), "the CPU overlay asks for a GPU")
        p.check("cuda" not in image, f"the CPU overlay runs a CUDA image {image}")


def main(argv) -> int:
    if len(argv) % 2 or not argv:
        print(__doc__, file=sys.stderr)
        return 2
    failed = 0
    for variant, path in zip(argv[::2], argv[1::2], strict=True):
        with open(path) as f:
            objs = [o for o in yaml.safe_load_all(f) if o]
        p = Problems()
        check_overlay(variant, objs, p)
        kinds = sorted(o["kind"] for o in objs)
        for m in p:
            print(f"manifest-check: {variant}: FAIL {m}")
        print(
            f"manifest-check: {variant}: {len(objs)} objects ({', '.join(kinds)}), "
            f"{len(p)} problems"
        )
        failed += len(p)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
