"""Writes the part of a CRD's openAPIV3Schema that .ci/deploy/manifest_check.py validates
against: one version's schema, with `status` and all descriptions removed and `spec` kept only
for the fields named. Used to vendor the schemas of operators that no pinned package provides
(.ci/deploy/crds/): run it on the CRD file of the operator's release tag and commit the output.
A field left out is then reported as unknown by the check, never accepted unchecked.

    python3 .ci/deploy/prune_crd.py CRD.yaml VERSION SOURCE FIELD... > .ci/deploy/crds/NAME.yaml
"""

import sys

import yaml


def strip(schema):
    """The schema without its descriptions (a property called description stays)."""
    if isinstance(schema, list):
        return [strip(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "description":
            continue
        if k == "properties":
            out[k] = {name: strip(s) for name, s in v.items()}
        elif k in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[k] = strip(v)
        else:
            out[k] = v
    return out


def main(argv) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    path, version, source, *fields = argv
    with open(path) as f:
        crd = yaml.safe_load(f)
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strip(v["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    spec = schema["properties"]["spec"]
    unknown = sorted(set(fields) - set(spec["properties"]))
    if unknown:
        print(f"not fields of spec: {unknown}", file=sys.stderr)
        return 1
    spec["properties"] = {k: spec["properties"][k] for k in sorted(fields)}
    spec["required"] = [r for r in spec.get("required", []) if r in fields]
    names = crd["spec"]["names"]
    print(f"# {names['kind']} ({crd['spec']['group']}/{version}): the openAPIV3Schema of {source},")
    print("# pruned by .ci/deploy/prune_crd.py to these spec fields (no descriptions, no status):")
    print(f"#   {' '.join(sorted(fields))}")
    print("# A field not kept here fails the check as unknown: add it by re-running the script.")
    out = {
        "group": crd["spec"]["group"],
        "version": version,
        "kind": names["kind"],
        "openAPIV3Schema": schema,
    }
    print(yaml.safe_dump(out, sort_keys=True, width=100), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
