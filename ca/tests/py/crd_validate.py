"""Validates Kubernetes objects against CRD schemas (openAPIV3Schema, as JSON Schema).

Reads {"schemas": {kind: schema}, "docs": [object, ...]} as JSON on stdin; prints
{"checked": n, "errors": [[index, kind, message], ...]}. An object whose kind has no schema
is an error too, so nothing passes unchecked.
"""

import json
import sys

import jsonschema


def main():
    req = json.load(sys.stdin)
    errors = []
    for i, doc in enumerate(req["docs"]):
        kind = doc.get("kind")
        schema = req["schemas"].get(kind)
        if schema is None:
            errors.append([i, kind, "no schema for this kind"])
            continue
        v = jsonschema.Draft7Validator(schema)
        for e in v.iter_errors(doc):
            path = "/".join(str(p) for p in e.absolute_path)
            errors.append([i, kind, f"{path}: {e.message}"])
    print(json.dumps({"checked": len(req["docs"]), "errors": errors}))


if __name__ == "__main__":
    main()
