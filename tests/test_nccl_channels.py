"""The NCCL transport's channel cap (mpiring.transport.nccl): parsed from
MPIRING_NCCL_CHANNELS, never over the user's own NCCL channel settings. Pure functions on
an environment mapping: no GPU or NCCL needed."""

import pytest

from mpiring.transport.nccl import DEFAULT_CHANNELS, NCCL_CHANNEL_VARS, cap_channels, channels_from_env

pytestmark = pytest.mark.serial


def test_default_and_explicit_channels():
    assert channels_from_env({}) == (DEFAULT_CHANNELS, None)
    assert channels_from_env({"MPIRING_NCCL_CHANNELS": " 8 "}) == (8, None)
    assert channels_from_env({"MPIRING_NCCL_CHANNELS": "0"}) == (0, None)


@pytest.mark.parametrize("text", ["-1", "four", "2.5"])
def test_bad_value_names_the_variable(text):
    channels, problem = channels_from_env({"MPIRING_NCCL_CHANNELS": text})
    assert channels is None and "MPIRING_NCCL_CHANNELS" in problem and repr(text) in problem


def test_cap_sets_only_when_the_user_chose_nothing():
    env = {}
    assert cap_channels(4, env) and env == {"NCCL_MAX_NCHANNELS": "4"}
    env = {}
    assert not cap_channels(0, env) and env == {}
    for name in NCCL_CHANNEL_VARS:
        env = {name: "16"}
        assert not cap_channels(4, env) and env == {name: "16"}
