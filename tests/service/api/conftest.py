"""API tests here count rows before and after requests, so their app runs no background
work (the scheduler's trial buffer would add trials of its own)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def app_hooks() -> list[Any]:
    return []
