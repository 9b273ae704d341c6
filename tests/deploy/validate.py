"""Offline checks of manifests: kubernetes-validate (strict, three Kubernetes versions) for core kinds,
the schemas of crd_schemas.py for custom resources (their pod and claim templates strict as core kinds),
and yamllint on the text."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from tests.deploy.crd_schemas import CRDS, claim_templates, pod_templates

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yamllint_config = pytest.importorskip("yamllint.config")
yamllint_linter = pytest.importorskip("yamllint.linter")

K8S_VERSIONS = ("1.29", "1.33", "1.37")
# yamllint's defaults, with room for the long lines of commands and scripts.
YAMLLINT = yamllint_config.YamlLintConfig("extends: default\nrules:\n  line-length: {max: 120}\n")


def _core(doc: dict[str, Any]) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{doc.get('kind')}: no Kubernetes {version} schema (a custom resource?)")
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc.get('kind')} {doc.get('metadata', {}).get('name')} (k8s {version}): {e.message} "
                          f"at {'.'.join(str(p) for p in e.path)}")
    return errors


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema error of one object; [] when it is valid."""
    kind = doc.get("kind")
    if kind not in CRDS:
        return _core(doc)
    errors = [f"{kind}: {e.message} at {'.'.join(str(p) for p in e.absolute_path)}"
              for e in jsonschema.Draft7Validator(CRDS[kind]).iter_errors(doc)]
    if errors:
        return errors
    for t in pod_templates(doc):
        errors += _core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t})
    for c in claim_templates(doc):
        errors += _core({"apiVersion": "v1", "kind": "PersistentVolumeClaim", **c})
    return errors


def yamllint_errors(text: str) -> list[str]:
    return [f"line {p.line}: {p.message}" for p in yamllint_linter.run(text, YAMLLINT)]
