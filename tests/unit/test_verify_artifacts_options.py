"""verify_artifacts' copy of amazon.aws' common options (used for a local backup set) equals amazon.aws'."""

from __future__ import annotations

from ansible_collections.amazon.aws.plugins.module_utils.modules import aws_argument_spec
from ansible_collections.drguard.sandbox.plugins.modules import verify_artifacts


def test_aws_options_are_amazon_aws_common_options_with_the_access_key_censored():
    theirs = aws_argument_spec()
    assert theirs["access_key"].get("no_log") is False  # amazon.aws' choice; ours censors it
    theirs["access_key"] = dict(theirs["access_key"], no_log=True)
    assert verify_artifacts.aws_options() == theirs


def test_aws_options_never_overlap_the_modules_own():
    assert not set(verify_artifacts.aws_options()) & set(verify_artifacts.ARGUMENT_SPEC)
