"""Static checks of deploy/grafana/atlas-serve.json that Grafana would otherwise show only on
import: every field known to Grafana's dashboard and panel schemas (Grafana 11.0, through the
models of grafana-foundation-sdk, which drop what they do not know), unique panel ids, panels
that do not overlap, every query on the ${datasource} variable (so the import asks nothing and
works with any Prometheus data source), a unit and a description on every panel. The queries
themselves are checked by live_check.py."""

import json
import re
import sys
from pathlib import Path

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/atlas-serve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Fields of an exported dashboard that Grafana writes itself but its schema leaves out: the
# import metadata, and the text of a query variable's query.
NOT_IN_SCHEMA = re.compile(r"/__inputs|/__requires|/templating/list\[\d+\]/definition")


def unknown_fields(data, back, path="") -> list[str]:
    """Paths present in the dashboard but lost in the round trip through the schema models."""
    if isinstance(data, dict) and isinstance(back, dict):
        out = []
        for k, v in data.items():
            if k not in back:
                out.append(f"{path}/{k}")
            else:
                out += unknown_fields(v, back[k], f"{path}/{k}")
        return out
    if isinstance(data, list) and isinstance(back, list):
        if len(data) != len(back):
            return [f"{path}: {len(data)} items, {len(back)} after the round trip"]
        pairs = enumerate(zip(data, back, strict=True))
        return [u for i, (a, b) in pairs for u in unknown_fields(a, b, f"{path}[{i}]")]
    return []


def schema_problems(dash: dict) -> list[str]:
    plugins.register_default_plugins()
    model = Dashboard.from_json(dash)
    back = json.loads(json.dumps(model, default=lambda o: o.to_json()))
    lost = [u for u in unknown_fields(dash, back) if not NOT_IN_SCHEMA.fullmatch(u)]
    return [f"{u}: not in Grafana's schema" for u in lost]


def main() -> int:
    dash = json.loads(DASHBOARD.read_text())
    problems = schema_problems(dash)
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)):
        problems.append("duplicate panel ids")
    cells = {}
    for p in panels:
        g = p["gridPos"]
        if g["x"] + g["w"] > 24:
            problems.append(f"{p['title']!r} is wider than the grid")
        for y in range(g["y"], g["y"] + g["h"]):
            for x in range(g["x"], g["x"] + g["w"]):
                if (x, y) in cells:
                    problems.append(f"{p['title']!r} overlaps {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        if p.get("datasource") != DS:
            problems.append(f"{p['title']!r}: data source is not ${{datasource}}")
        for t in p.get("targets", []):
            if t.get("datasource") != DS or not t.get("expr"):
                problems.append(f"{p['title']!r} {t.get('refId')}: no expr on ${{datasource}}")
        if not p.get("description"):
            problems.append(f"{p['title']!r}: no description")
        if p["type"] != "heatmap" and not p["fieldConfig"]["defaults"].get("unit"):
            problems.append(f"{p['title']!r}: no unit")
    names = [v["name"] for v in dash["templating"]["list"]]
    if names[:1] != ["datasource"]:
        problems.append("the first variable must be the data source")
    for m in sorted(set(problems)):
        print(f"dashboard-check: FAIL {m}")
    print(
        f"dashboard-check: {len(panels)} panels, {len(names)} variables, "
        f"{len(set(problems))} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
