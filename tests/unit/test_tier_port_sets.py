"""boundary_verify's tier rules compare port sets: AWS keeps ranges as they were written (split or merged)."""

from __future__ import annotations

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils._network_build import merge_port_ranges as _merge_ports
from ansible_collections.drguard.sandbox.plugins.module_utils._boundary_live import _ports_minus


@pytest.mark.parametrize("ranges, merged", [
    ([], []),
    ([(5432, 5432)], [(5432, 5432)]),
    ([(8050, 8100), (8000, 8049)], [(8000, 8100)]),       # adjacent
    ([(1, 10), (5, 20), (30, 30)], [(1, 20), (30, 30)]),  # overlapping, then a gap
    ([(22, 22), (22, 22)], [(22, 22)]),
])
def test_merge_ports(ranges, merged):
    assert _merge_ports(ranges) == merged


@pytest.mark.parametrize("ranges, cut, left", [
    ([(8000, 8100)], [(8000, 8049), (8050, 8100)], []),            # split the same set: nothing left
    ([(8000, 8049), (8050, 8100)], [(8000, 8100)], []),            # merged the same set
    ([(8000, 8100)], [(8000, 8049)], [(8050, 8100)]),              # the tail is missing
    ([(5432, 5433)], [(5432, 5432)], [(5433, 5433)]),              # one port too many
    ([(1, 100)], [(10, 20), (50, 60)], [(1, 9), (21, 49), (61, 100)]),
    ([(5432, 5432)], [], [(5432, 5432)]),
    ([], [(1, 65535)], []),
    ([(0, 65535)], [(5432, 5432)], [(0, 5431), (5433, 65535)]),
])
def test_ports_minus(ranges, cut, left):
    assert _ports_minus(ranges, cut) == left
