"""Suite-wide ordering: fast unit tests first, integration tests (real engine) last."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)
