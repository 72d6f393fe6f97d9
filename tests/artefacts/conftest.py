"""The artefact layer: checks of the files we ship (Dockerfile, Kubernetes manifests, Envoy
configs, monitoring rules and dashboard, docs, generated protobuf code, dependency floors)
against the code and the real tools (envoy --mode validate, kubectl kustomize, promtool). Not the
pure core (tests/unit) and not our servers (tests/integration): these run external binaries and
read the repository. Every test here carries the ``artefacts`` marker."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.artefacts)
