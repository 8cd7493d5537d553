#!/usr/bin/env python3
"""Validates custom resources against their CRDs' OpenAPI v3 schemas, as the
API server would: unknown fields are errors (structural schemas prune them,
and strait's types refuse them), and `nullable` allows null.

usage: validate_custom_resources.py CRDS.yaml RESOURCES.yaml...
Exits 1 naming every resource that fails."""
import sys

import jsonschema
import yaml


def openapi_to_jsonschema(s):
    if isinstance(s, list):
        return [openapi_to_jsonschema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: openapi_to_jsonschema(v) for k, v in s.items() if not k.startswith("x-kubernetes")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def main():
    crds, files = sys.argv[1], sys.argv[2:]
    schemas = {}
    for crd in yaml.safe_load_all(open(crds)):
        for v in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])
            schema = openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
            # metadata is the API server's to check.
            schema.setdefault("properties", {}).update(
                {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}})
            schemas[key] = schema
    failed, checked = 0, 0
    for f in files:
        for doc in yaml.safe_load_all(open(f)):
            if not doc:
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key not in schemas:
                continue
            checked += 1
            name = f"{f}: {doc['kind']}/{doc['metadata']['name']}"
            errors = list(jsonschema.Draft7Validator(schemas[key]).iter_errors(doc))
            for e in errors:
                print(f"FAIL {name}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
            if errors:
                failed += 1
            else:
                print(f"ok   {name}")
    print(f"{checked} custom resources checked, {failed} failed")
    sys.exit(1 if failed or not checked else 0)


main()
