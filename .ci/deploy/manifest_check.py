"""Checks of the rendered Kubernetes manifests that a schema cannot make: that the objects refer
to each other correctly and that the deployment keeps the promises of deploy/README.md
(security context, probes, the rules of its mode, a GPU only in a GPU overlay). Also validates
the operators' objects, which kubernetes-validate does not know, against their CRD schemas:
the Prometheus Operator's and KEDA's from pinned packages (cloudcoil's models), CloudNativePG's
from a pruned copy of its CRD (.ci/deploy/crds/).

The overlay's name gives its mode and device: `replicated*` overlays run N replicas on
PostgreSQL, the others the embedded single replica; a `gpu` part in the name means a GPU.

    python3 .ci/deploy/manifest_check.py gpu rendered-gpu.yaml replicated rendered-replicated.yaml
"""

import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring

DEFAULTS = Path(__file__).resolve().parents[2] / "config/default.toml"
CRDS = Path(__file__).resolve().parent / "crds"
# ATLAS_* variables that are not `serve` settings: the demo world's cache root, the config file.
OTHER_VARS = {"ATLAS_CACHE", "ATLAS_CONFIG"}
HOSTNAME = "kubernetes.io/hostname"
# Operator objects and how they are validated (kubernetes-validate skips them).
MODELS = {
    "ServiceMonitor": monitoring.ServiceMonitor,
    "PrometheusRule": monitoring.PrometheusRule,
    "ScaledObject": keda.ScaledObject,
}
SCHEMAS = {"Cluster": CRDS / "postgresql.cnpg.io_cluster.yaml"}
PORT = "http"
STARTUP_BUDGET_S = 600  # the backbone download and the demo world build take minutes


class Problems(list):
    notes: list[str]

    def __init__(self):
        super().__init__()
        self.notes = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


def by_kind(objs, kind):
    return [o for o in objs if o.get("kind") == kind]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def builtin(obj) -> bool:
    """Kubernetes' own API groups: none (core), one word (apps, policy), or *.k8s.io."""
    group = obj.get("apiVersion", "").rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def closed(schema):
    """An OpenAPI schema in which objects with properties accept no other field: what the API
    server prunes from a structural schema's objects is reported as unknown instead."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if isinstance(v, (dict, list)) else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


def check_crds(objs, p: Problems) -> None:
    """The operators' CRD schemas, and no field they do not know (a round trip through the
    generated models loses unknown fields; the vendored schemas are closed)."""
    for kind in ("ServiceMonitor", "PrometheusRule"):
        found = by_kind(objs, kind)
        p.check(len(found) == 1, f"expected one {kind}, found {len(found)}")
    for o in objs:
        kind, name = o.get("kind"), o["metadata"]["name"]
        if kind in MODELS:
            try:
                back = (
                    MODELS[kind]
                    .model_validate(o)
                    .model_dump(by_alias=True, exclude_unset=True, mode="json")
                )
            except Exception as e:  # pydantic's ValidationError names the field
                p.append(f"{kind} {name}: {e}")
                continue
            p.check(back == o, f"{kind} {name}: fields the CRD does not know")
        elif kind in SCHEMAS:
            crd = yaml.safe_load(SCHEMAS[kind].read_text())
            want = f"{crd['group']}/{crd['version']}"
            if o["apiVersion"] != want:
                p.append(f"{kind} {name}: apiVersion {o['apiVersion']}, the schema is {want}")
                continue
            validator = jsonschema.Draft7Validator(closed(crd["openAPIV3Schema"]))
            for e in sorted(validator.iter_errors(o), key=lambda e: list(e.path)):
                where = "/".join(str(x) for x in e.path)
                p.append(f"{kind} {name}: /{where}: {e.message}")
        else:
            p.check(builtin(o), f"{kind} {name}: no schema for this kind in the check")
    # A Cluster's x-kubernetes-validations (CEL) are not evaluated: jsonschema has no CEL.


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


def env_sources(objs, c: dict) -> dict:
    """Each variable of a container: ("value", v) from env or a rendered ConfigMap,
    ("secret", name, key), ("field", path) or ("other",)."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in by_kind(objs, "ConfigMap")}
    out = {}
    for ref in c.get("envFrom", []):
        name = ref.get("configMapRef", {}).get("name")
        for k, v in maps.get(name, {}).items():
            out[k] = ("value", v)
    for e in c.get("env", []):
        src = e.get("valueFrom")
        if src is None:
            out[e["name"]] = ("value", e.get("value", ""))
        elif "secretKeyRef" in src:
            out[e["name"]] = ("secret", src["secretKeyRef"]["name"], src["secretKeyRef"]["key"])
        elif "fieldRef" in src:
            out[e["name"]] = ("field", src["fieldRef"]["fieldPath"])
        else:
            out[e["name"]] = ("other",)
    return out


def volume_at(path: str, c: dict, pod: dict):
    """The pod volume that holds `path` in container c (the deepest mount above it)."""
    mounts = [
        m
        for m in c.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    if not mounts:
        return None
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    return next((v for v in pod.get("volumes", []) if v["name"] == m["name"]), None)


def access_modes(objs, volume) -> set:
    claim = (volume or {}).get("persistentVolumeClaim", {}).get("claimName")
    pvcs = [o for o in by_kind(objs, "PersistentVolumeClaim") if o["metadata"]["name"] == claim]
    return set(pvcs[0]["spec"].get("accessModes", [])) if pvcs else set()


def spreads_over_nodes(pod: dict, labels: dict) -> bool:
    """A hard topology spread over nodes, or pod anti-affinity over nodes, for these pods."""
    for t in pod.get("topologySpreadConstraints", []):
        if (
            t.get("topologyKey") == HOSTNAME
            and t.get("whenUnsatisfiable") == "DoNotSchedule"
            and selects(t.get("labelSelector", {}).get("matchLabels", {}), labels)
        ):
            return True
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    terms += [
        w["podAffinityTerm"]
        for w in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    ]
    return any(
        t.get("topologyKey") == HOSTNAME
        and selects(t.get("labelSelector", {}).get("matchLabels", {}), labels)
        for t in terms
    )


def autoscalers(objs) -> list[tuple[str, dict, int, int]]:
    """(what, target, min, max) of each HPA and KEDA ScaledObject."""
    out = []
    for h in by_kind(objs, "HorizontalPodAutoscaler"):
        s = h["spec"]
        out.append(
            (
                f"HPA {h['metadata']['name']}",
                s["scaleTargetRef"],
                s.get("minReplicas", 1),
                s["maxReplicas"],
            )
        )
    for o in by_kind(objs, "ScaledObject"):
        s = o["spec"]
        target = {"kind": "Deployment", **s["scaleTargetRef"]}
        out.append(
            (
                f"ScaledObject {o['metadata']['name']}",
                target,
                s.get("minReplicaCount", 0),
                s.get("maxReplicaCount", 100),
            )
        )
    return out


def check_embedded(objs, d: dict, server: dict, p: Problems) -> None:
    """One replica on the embedded SQLite store and its ReadWriteOnce volume."""
    spec = d["spec"]
    p.check(spec.get("replicas") == 1, "replicas must stay 1 (embedded SQLite store)")
    p.check(
        spec.get("strategy", {}).get("type") == "Recreate",
        "the ReadWriteOnce volume needs the Recreate strategy",
    )
    p.check(
        not autoscalers(objs),
        "an HPA or ScaledObject, but replicas cannot share the embedded store",
    )
    env = env_sources(objs, server)
    p.check(
        env.get("ATLAS_DATABASE_URL", ("value", ""))[-1] == "",
        "ATLAS_DATABASE_URL set: the embedded overlays keep the SQLite store",
    )


def check_replicated(objs, d: dict, server: dict, p: Problems) -> None:
    """N replicas on PostgreSQL and a shared ReadWriteMany volume."""
    spec = d["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    replicas = spec.get("replicas", 1)
    p.check(replicas >= 2, f"replicas {replicas}: the replicated mode runs at least 2")
    p.check(
        spec.get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate",
        "the replicated mode rolls pods (RollingUpdate), it does not stop them all",
    )
    env = env_sources(objs, server)

    url = env.get("ATLAS_DATABASE_URL", ("none",))
    p.check(url[0] == "secret", f"ATLAS_DATABASE_URL does not come from a Secret: {url[0]}")
    clusters = [o["metadata"]["name"] for o in by_kind(objs, "Cluster")]
    if url[0] == "secret" and clusters:
        p.check(
            url[1:] in [(f"{c}-app", "uri") for c in clusters],
            f"ATLAS_DATABASE_URL reads {url[1]}/{url[2]}, not a CloudNativePG app Secret "
            f"({', '.join(f'{c}-app/uri' for c in clusters)})",
        )
    p.check(len(clusters) <= 1, f"{len(clusters)} database Clusters")
    replica = env.get("ATLAS_REPLICA", ("none",))
    p.check(
        replica == ("field", "metadata.name"),
        f"ATLAS_REPLICA is not the pod's name (downward API metadata.name): {replica}",
    )

    # Files every replica must see alike on the shared volume; the data dir is scratch.
    for var in ("ATLAS_BLOB_DIR", "ATLAS_TV_DIR"):
        value = env.get(var, ("none", ""))
        if value[0] != "value" or not value[1]:
            p.append(f"{var} is not set")
            continue
        vol = volume_at(value[1], server, pod)
        p.check(
            "ReadWriteMany" in access_modes(objs, vol),
            f"{var}={value[1]} is not on a ReadWriteMany volume",
        )
    data = env.get("ATLAS_DATA_DIR", ("value", "atlas-data"))[-1]
    vol = volume_at(data, server, pod)
    p.check(vol is not None and "emptyDir" in vol, f"ATLAS_DATA_DIR={data} is not on an emptyDir")
    for v in pod.get("volumes", []):
        if "persistentVolumeClaim" in v:
            modes = access_modes(objs, v)
            p.check(
                "ReadWriteMany" in modes,
                f"volume {v['name']} is {sorted(modes)}: replicas on other nodes cannot mount it",
            )

    # Disruptions and scaling: the budget leaves room to evict, the autoscaler never goes
    # below it, and the replicas are on different nodes.
    pdbs = by_kind(objs, "PodDisruptionBudget")
    min_available = None
    for b in pdbs:
        m = b["spec"].get("minAvailable")
        if not isinstance(m, int) or "maxUnavailable" in b["spec"]:
            name = b["metadata"]["name"]
            p.append(f"PDB {name}: expected an integer minAvailable alone, got {b['spec']}")
            continue
        min_available = m
        p.check(
            1 <= m < replicas,
            f"PDB minAvailable {m} with {replicas} replicas: drains would block",
        )
    scalers = autoscalers(objs)
    p.check(
        len(scalers) == 1,
        f"expected one autoscaler (an HPA or a KEDA ScaledObject), found {[s[0] for s in scalers]}",
    )
    for what, target, lo, hi in scalers:
        p.check(
            target.get("kind") == "Deployment" and target.get("name") == d["metadata"]["name"],
            f"{what} scales {target}, not the Deployment",
        )
        if min_available is not None:
            p.check(
                lo >= min_available, f"{what} min {lo} under the PDB's minAvailable {min_available}"
            )
        p.check(lo <= replicas <= hi, f"{what} range {lo}..{hi} excludes the replicas {replicas}")
        p.check(hi > lo, f"{what}: max {hi} is not above min {lo}")
    p.check(spreads_over_nodes(pod, labels), "the replicas are not spread across nodes")


def check_overlay(variant: str, objs: list, p: Problems) -> None:
    deps = by_kind(objs, "Deployment")
    p.check(len(deps) == 1, f"expected one Deployment, found {len(deps)}")
    if not deps:
        return
    d = deps[0]
    spec = d["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
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
        if variant.split("-")[0] == "replicated":
            check_replicated(objs, d, server[0], p)
        else:
            check_embedded(objs, d, server[0], p)

    # References between the objects.
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for c in containers + pod.get("initContainers", []):
        for ref in c.get("envFrom", []):
            if "configMapRef" in ref:
                p.check(
                    ("ConfigMap", ref["configMapRef"]["name"]) in names,
                    f"ConfigMap {ref['configMapRef']['name']} is not rendered",
                )
    claims = set()
    for v in pod.get("volumes", []):
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            claims.add(claim)
            p.check(("PersistentVolumeClaim", claim) in names, f"PVC {claim} is not rendered")
    for o in by_kind(objs, "PersistentVolumeClaim"):
        p.check(o["metadata"]["name"] in claims, f"PVC {o['metadata']['name']} is not mounted")
    for o in by_kind(objs, "ConfigMap"):
        p.check(
            "ATLAS_DATABASE_URL" not in o.get("data", {}),
            "ATLAS_DATABASE_URL in a ConfigMap: the URL holds a password, keep it in a Secret",
        )
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

    # What differs between CPU and GPU overlays.
    gpus = [
        c.get("resources", {}).get(part, {}).get("nvidia.com/gpu")
        for c in containers
        for part in ("requests", "limits")
    ]
    image = server[0]["image"] if server else ""
    if "gpu" in variant.split("-"):
        p.check(
            server and server[0]["resources"]["limits"].get("nvidia.com/gpu") == 1,
            f"the GPU overlay {variant} does not ask for nvidia.com/gpu: 1",
        )
        p.check("cuda" in image, f"the GPU overlay {variant} runs a non-CUDA image {image}")
    else:
        p.check(not any(gpus), f"the CPU overlay {variant} asks for a GPU")
        p.check("cuda" not in image, f"the CPU overlay {variant} runs a CUDA image {image}")


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
        for m in p.notes:
            print(f"manifest-check: {variant}: note: {m}")
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
