# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0
"""Small boto3 helpers shared by our modules (private)."""

from __future__ import annotations


def paginate(client, op: str, key: str, **kwargs) -> list:
    """Every item under ``key`` of ``op``, following pagination when the API has it."""
    if client.can_paginate(op):
        out = []
        for page in client.get_paginator(op).paginate(**kwargs):
            out.extend(page.get(key) or [])
        return out
    return getattr(client, op)(**kwargs).get(key) or []
