"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
from daemons import ClusterCa

from peerd.ops.ca import init_ca


@pytest.fixture(scope="session")
def cluster_ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCa:
    """One cluster CA for the whole test session: daemons and clients get real certificates."""
    return ClusterCa(init_ca(tmp_path_factory.mktemp("cluster-ca")))
