"""Unit tests of the checkers' own parsing (run by .ci/deploy-checks): a checker that misreads
an expression would pass a dashboard it should fail."""

import copy
import shutil
import subprocess
import sys
import unittest
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import manifest_check  # noqa: E402
from dashboard_check import unknown_fields  # noqa: E402
from live_check import adapter_query, has_data, metric_names, substitute  # noqa: E402

OVERLAYS = Path(__file__).resolve().parents[2] / "deploy/kubernetes/overlays"


class MetricNames(unittest.TestCase):
    def test_selectors_functions_and_grouping(self):
        expr = (
            "histogram_quantile(0.95, sum by (le, route) (rate("
            'atlas_http_request_duration_seconds_bucket{job=~"$job", route!~"/metrics|/healthz"}'
            "[5m])))"
        )
        self.assertEqual(metric_names(expr), {"atlas_http_request_duration_seconds_bucket"})

    def test_binary_operators_and_matching(self):
        expr = (
            "sum by (job) (rate(a_total[5m])) / on (job) group_left (kind) b_bytes"
            " > bool 1e3 and c unless d offset 5m or -Inf < e"
        )
        self.assertEqual(metric_names(expr), {"a_total", "b_bytes", "c", "d", "e"})

    def test_strings_and_label_values_are_not_metrics(self):
        expr = 'count by (state) (atlas_jobs{state="failed", reason=~"queue_full|x_total"})'
        self.assertEqual(metric_names(expr), {"atlas_jobs"})

    def test_a_misspelt_metric_is_reported(self):
        self.assertIn("atlas_cache_hit_total", metric_names("rate(atlas_cache_hit_total[1m])"))


class Substitute(unittest.TestCase):
    def test_grafana_variables(self):
        got = substitute('rate(x{job=~"$job", instance=~"${instance}"}[$__rate_interval])')
        self.assertEqual(got, 'rate(x{job=~"atlas-serve", instance=~".*"}[1m])')

    def test_unknown_variable_is_an_error(self):
        with self.assertRaises(ValueError):
            substitute('x{route="$route"}')


class HasData(unittest.TestCase):
    def test_nan_only_is_no_data(self):
        self.assertFalse(has_data([{"value": [0, "NaN"]}]))
        self.assertFalse(has_data([]))
        self.assertTrue(has_data([{"value": [0, "NaN"]}, {"value": [0, "0.5"]}]))


class UnknownFields(unittest.TestCase):
    def test_lost_keys_and_items_are_reported(self):
        data = {"a": 1, "b": {"c": 2, "d": 3}, "l": [{"x": 1}, {"y": 2}]}
        back = {"a": 1, "b": {"c": 2}, "l": [{"x": 1}, {}]}
        self.assertEqual(unknown_fields(data, back), ["/b/d", "/l[1]/y"])
        self.assertEqual(
            unknown_fields({"l": [1, 2]}, {"l": [1]}), ["/l: 2 items, 1 after the round trip"]
        )


def render(overlay: str) -> list:
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS / overlay)], check=True, capture_output=True
    ).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def one(objs, kind):
    (o,) = [o for o in objs if o["kind"] == kind]
    return o


def server(objs):
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@unittest.skipUnless(shutil.which("kubectl"), "kubectl (from .ci/deploy-checks' tools)")
class ManifestPolicy(unittest.TestCase):
    """Each rule of the replicated mode fails the rendered overlay when broken, and the
    embedded rules reject it."""

    @classmethod
    def setUpClass(cls):
        cls.replicated = render("replicated")
        cls.hpa = render("replicated-gpu")

    def problems(self, change, variant="replicated", objs=None):
        objs = copy.deepcopy(objs or self.replicated)
        change(objs)
        p = manifest_check.Problems()
        manifest_check.check_overlay(variant, objs, p)
        return p

    def assertFails(self, change, fragment, objs=None):
        got = self.problems(change, objs=objs)
        self.assertTrue(any(fragment in m for m in got), f"{fragment!r} not in {got}")

    def test_the_overlays_pass(self):
        self.assertEqual(self.problems(lambda o: None), [])
        self.assertEqual(self.problems(lambda o: None, "replicated-gpu", self.hpa), [])

    def test_embedded_rules_reject_replicas(self):
        got = self.problems(lambda o: None, "cpu")
        for fragment in ("replicas must stay 1", "Recreate", "HPA or ScaledObject"):
            self.assertTrue(any(fragment in m for m in got), f"{fragment!r} not in {got}")

    def test_replicas_and_strategy(self):
        self.assertFails(lambda o: one(o, "Deployment")["spec"].update(replicas=1), "at least 2")
        self.assertFails(
            lambda o: one(o, "Deployment")["spec"].update(strategy={"type": "Recreate"}),
            "RollingUpdate",
        )

    def test_database_url_and_replica_name(self):
        def plain(o):
            server(o)["env"][0] = {"name": "ATLAS_DATABASE_URL", "value": "postgres://u:p@h/db"}

        self.assertFails(plain, "does not come from a Secret")

        def other_secret(o):
            server(o)["env"][0]["valueFrom"]["secretKeyRef"]["name"] = "elsewhere"

        self.assertFails(other_secret, "not a CloudNativePG app Secret")

        def in_configmap(o):
            one(o, "ConfigMap")["data"]["ATLAS_DATABASE_URL"] = "postgres://u:p@h/db"

        self.assertFails(in_configmap, "keep it in a Secret")
        self.assertFails(lambda o: server(o)["env"].pop(1), "ATLAS_REPLICA")

    def test_volumes(self):
        self.assertFails(
            lambda o: one(o, "ConfigMap")["data"].update(ATLAS_BLOB_DIR="/data/blobs"),
            "ATLAS_BLOB_DIR=/data/blobs is not on a ReadWriteMany volume",
        )
        self.assertFails(
            lambda o: one(o, "PersistentVolumeClaim")["spec"].update(accessModes=["ReadWriteOnce"]),
            "replicas on other nodes cannot mount it",
        )
        self.assertFails(
            lambda o: one(o, "ConfigMap")["data"].update(ATLAS_DATA_DIR="/shared/store"),
            "is not on an emptyDir",
        )

    def test_disruption_budget_and_autoscaler(self):
        self.assertFails(
            lambda o: one(o, "PodDisruptionBudget")["spec"].update(minAvailable=3),
            "drains would block",
        )
        self.assertFails(
            lambda o: one(o, "ScaledObject")["spec"].update(minReplicaCount=1),
            "under the PDB's minAvailable",
        )
        self.assertFails(
            lambda o: one(o, "HorizontalPodAutoscaler")["spec"].update(minReplicas=1),
            "under the PDB's minAvailable",
            objs=self.hpa,
        )
        self.assertFails(
            lambda o: o.append(one(self.hpa, "HorizontalPodAutoscaler")), "expected one autoscaler"
        )
        self.assertFails(lambda o: o.remove(one(o, "ScaledObject")), "expected one autoscaler")

    def test_spread(self):
        def no_spread(o):
            one(o, "Deployment")["spec"]["template"]["spec"].pop("topologySpreadConstraints")

        self.assertFails(no_spread, "not spread across nodes")

    def test_crd_schemas(self):
        self.assertFails(
            lambda o: one(o, "Cluster")["spec"]["storage"].update(sise="1Gi"),
            "'sise' was unexpected",
        )
        self.assertFails(
            lambda o: one(o, "Cluster")["spec"].update(instances="3"), "is not of type 'integer'"
        )
        self.assertFails(
            lambda o: one(o, "ScaledObject")["spec"].update(minReplicas=3),
            "fields the CRD does not know",
        )
        self.assertFails(
            lambda o: o.append(
                {"apiVersion": "x.example.com/v1", "kind": "X", "metadata": {"name": "x"}}
            ),
            "no schema for this kind",
        )


class AdapterQuery(unittest.TestCase):
    def test_the_hpa_asks_for_metrics_the_adapter_serves(self):
        components = OVERLAYS.parent / "components/autoscaling-hpa"
        rules = yaml.safe_load((components / "prometheus-adapter.yaml").read_text())["rules"]
        served = {
            kind: {r.get("name", {}).get("as") or r["seriesQuery"].split("{")[0] for r in rs}
            for kind, rs in rules.items()
            if isinstance(rs, list)
        }
        hpa = yaml.safe_load((components / "hpa.yaml").read_text())
        for m in hpa["spec"]["metrics"]:
            kind = {"External": "external", "Pods": "custom", "Object": "custom"}[m["type"]]
            name = m[m["type"].lower()]["metric"]["name"]
            self.assertIn(name, served.get(kind, set()), f"{m['type']} metric {name}")

    def test_templates_are_filled(self):
        rule = {
            "seriesQuery": 'atlas_jobs{job="atlas-serve",state="queued",namespace!=""}',
            "metricsQuery": 'max(<<.Series>>{state="queued",<<.LabelMatchers>>})',
        }
        self.assertEqual(
            adapter_query(rule, "atlas-serve"),
            'max(atlas_jobs{state="queued",job="atlas-serve"})',
        )
        rule = {
            "seriesQuery": 'atlas_queue_depth{job="atlas-serve",pod!=""}',
            "metricsQuery": "max by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})",
        }
        self.assertEqual(
            adapter_query(rule, "atlas-serve"),
            'max by (pod) (atlas_queue_depth{job="atlas-serve"})',
        )


if __name__ == "__main__":
    unittest.main()
