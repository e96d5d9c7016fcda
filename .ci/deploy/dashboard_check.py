"""Static checks of deploy/grafana/atlas-serve.json that Grafana would otherwise show only on
import: unique panel ids, panels that do not overlap, every query on the ${datasource}
variable (so the import asks nothing and works with any Prometheus data source), a unit and a
description on every panel. The queries themselves are checked by live_check.py."""

import json
import sys
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/atlas-serve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}


def main() -> int:
    dash = json.loads(DASHBOARD.read_text())
    problems = []
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
