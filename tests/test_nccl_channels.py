"""The NCCL transport's channel cap (mpiring.transport.nccl): parsed from
MPIRING_NCCL_CHANNELS, never over the user's own NCCL channel settings; its lean
communicator's config and library lookup (mpiring.transport._nccl_lib). Pure functions on
an environment mapping or a file: no GPU or NCCL needed."""

import ctypes

import pytest

from mpiring.transport import _nccl_lib
from mpiring.transport.nccl import (
    DEFAULT_CHANNELS,
    DEFAULT_LEAN_CHANNELS,
    NCCL_CHANNEL_VARS,
    cap_channels,
    channels_from_env,
)

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


def test_lean_channels_from_their_own_variable():
    lean = {"name": "MPIRING_NCCL_LEAN_CHANNELS", "default": DEFAULT_LEAN_CHANNELS}
    assert channels_from_env({}, **lean) == (DEFAULT_LEAN_CHANNELS, None)
    assert channels_from_env({"MPIRING_NCCL_CHANNELS": "8"}, **lean) == (DEFAULT_LEAN_CHANNELS, None)
    assert channels_from_env({"MPIRING_NCCL_LEAN_CHANNELS": "0"}, **lean) == (0, None)
    channels, problem = channels_from_env({"MPIRING_NCCL_LEAN_CHANNELS": "x"}, **lean)
    assert channels is None and "MPIRING_NCCL_LEAN_CHANNELS='x'" in problem and "0: none" in problem


def test_config_is_nccl_2_17s_initializer_with_max_ctas():
    """ncclConfig_t as NCCL 2.17 lays it out: NCCL copies ``size`` bytes and reads
    minCTAs/maxCTAs only from a config of version 2.17 or later."""
    c = _nccl_lib.config(4)
    undef = -(2**31)
    assert c.size == ctypes.sizeof(_nccl_lib._Config) == 48  # size_t, 2 uint, 4 int, pointer, int (padded)
    assert (c.magic, c.version) == (0xCAFEBEEF, 21700)
    assert (c.blocking, c.cgaClusterSize, c.minCTAs, c.maxCTAs, c.netName, c.splitShare) == (
        undef, undef, undef, 4, None, undef)
    offsets = [getattr(_nccl_lib._Config, f).offset for f in ("magic", "version", "maxCTAs", "netName", "splitShare")]
    assert offsets == [8, 12, 28, 32, 40]


def test_the_one_mapped_libnccl_is_found(tmp_path):
    line = "7f00-7f10 r-xp 00000000 08:01 42 {}\n"
    maps = tmp_path / "maps"
    maps.write_text(line.format("/usr/lib/libc.so.6") + line.format("/site/nvidia/nccl/lib/libnccl.so.2") * 2
                    + "7f20-7f30 rw-p 00000000 00:00 0 \n")
    assert _nccl_lib.loaded_path(str(maps)) == "/site/nvidia/nccl/lib/libnccl.so.2"
    maps.write_text(line.format("/a/libnccl.so.2") + line.format("/b/libnccl.so.2"))
    assert _nccl_lib.loaded_path(str(maps)) is None  # two NCCLs: which one is CuPy's is unknown
    maps.write_text(line.format("/usr/lib/libc.so.6"))
    assert _nccl_lib.loaded_path(str(maps)) is None
    assert _nccl_lib.loaded_path(str(tmp_path / "absent")) is None
