"""The migration's marks in a state directory, and the URIs a migration may go to."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vmhost import marks
from vmhost.vm.migration import check_uri, tcp_uri


def test_a_request_to_receive_is_taken_once(tmp_path: Path) -> None:
    """The next vmhost takes the request to receive; the one after boots as usual."""
    marks.request_incoming(tmp_path)
    assert marks.take_incoming(tmp_path)
    assert not marks.take_incoming(tmp_path)


def test_a_stale_request_to_receive_is_ignored(tmp_path: Path) -> None:
    """A request nobody took within a minute does not make a later start wait for a guest."""
    (tmp_path / marks.INCOMING).write_text(f"{time.time() - 1:.0f}\n")
    assert not marks.take_incoming(tmp_path)
    assert not (tmp_path / marks.INCOMING).exists()


def test_migrated_is_noted_and_forgotten(tmp_path: Path) -> None:
    """Where the guest went, until the VM starts here again."""
    assert marks.migrated(tmp_path) is None
    marks.note_migrated(tmp_path, "tcp:host2:49152")
    assert marks.migrated(tmp_path) == "tcp:host2:49152"
    marks.forget_migrated(tmp_path)
    assert marks.migrated(tmp_path) is None


@pytest.mark.parametrize(
    "uri", ["tcp:host2:49152", "tcp:10.0.0.2:1", "tcp:[fe80::1]:49152", "tcp:host-2.example:9"]
)
def test_tcp_uris_are_taken(uri: str) -> None:
    """A tcp:HOST:PORT target is one."""
    assert check_uri(uri) == ""


@pytest.mark.parametrize(
    "uri",
    [
        "exec:sh -c 'rm -rf /'",
        "fd:3",
        "unix:/run/x.sock",
        "tcp:host2",
        "tcp:host 2:49152",
        "tcp:host2:port",
        "tcp::49152",
        "",
    ],
)
def test_anything_but_tcp_is_refused(uri: str) -> None:
    """exec:, fd:, unix: and malformed URIs are refused: QEMU would run or reach anything."""
    assert check_uri(uri).startswith("not a tcp:HOST:PORT URI")


def test_an_ipv6_address_is_bracketed() -> None:
    """QEMU's URI takes an IPv6 address in brackets."""
    assert tcp_uri("::1", 7) == "tcp:[::1]:7"
    assert tcp_uri("127.0.0.1", 7) == "tcp:127.0.0.1:7"
