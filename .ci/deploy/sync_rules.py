"""The alert rules exist twice: deploy/prometheus/rules/atlas-serve.rules.yml for a plain
Prometheus (and promtool), and a PrometheusRule object for the Prometheus Operator. This writes
the second from the first (--write) or fails when they differ (--check, what CI runs)."""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules/atlas-serve.rules.yml"
OBJECT = ROOT / "deploy/kubernetes/components/prometheus-operator/prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/rules/atlas-serve.rules.yml by
# `python3 .ci/deploy/sync_rules.py --write`; edit the rules there. CI fails when they differ.
"""


def wanted() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "atlas-serve", "labels": {"app.kubernetes.io/name": "atlas-serve"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=100)


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "--check"
    if mode == "--write":
        OBJECT.write_text(wanted())
        return 0
    if mode != "--check":
        print(f"usage: {sys.argv[0]} --check|--write", file=sys.stderr)
        return 2
    if not OBJECT.exists() or OBJECT.read_text() != wanted():
        print(
            f"{OBJECT.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: "
            "run python3 .ci/deploy/sync_rules.py --write",
            file=sys.stderr,
        )
        return 1
    print("PrometheusRule matches the rules file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
