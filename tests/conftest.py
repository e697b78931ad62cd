"""Shared fixtures: the real fixture closure built once per session, and spec variants of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import make_fixture
from tests.support.fixture_images import FixtureImages
from tests.support.specs import SpecFactory


@pytest.fixture(scope="session")
def fixture_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """spec.json of an efi image of the fixture closure (closure built in the real /nix/store)."""
    return make_fixture(tmp_path_factory.mktemp("fixture"))


@pytest.fixture(scope="session")
def make_spec(fixture_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> SpecFactory:
    """Write a variant of the fixture spec with top-level keys replaced; returns its path."""
    base: dict[str, Any] = json.loads(fixture_spec.read_text())
    counter = iter(range(10**6))

    def factory(**overrides: Any) -> Path:
        doc = {**base, **overrides}
        path = tmp_path_factory.mktemp("spec") / f"spec-{next(counter)}.json"
        path.write_text(json.dumps(doc, indent=2))
        return path

    return factory


@pytest.fixture(scope="session")
def fixture_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FixtureImages]:
    """The fixture system's images through the build VM, each built once per session (tests/support)."""
    images = FixtureImages(tmp_path_factory.mktemp("fixture-images"))
    yield images
    images.close()
