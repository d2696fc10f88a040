"""What ``vmhost serve`` imports: only what serving uses (one vmhost runs per VM)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SERVE_IMPORTS = """
import sys
from vmhost import cli
from vmhost.lean import without_unused
with without_unused():  # as cli.vmhost_main does, argparse included
    cli._vmhost_args(["serve", "NAME"])
    from vmhost.service import run
"""


def _python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    ).stdout


def test_serve_imports_no_openssl_no_archives_no_client() -> None:
    """The serve path loads neither ssl, OpenSSL's hashes, bz2, lzma, the client, nor
    logging.handlers and its pickle."""
    out = _python(
        SERVE_IMPORTS
        + """
unused = ("ssl", "_ssl", "_hashlib", "bz2", "lzma", "vmhost.client", "logging.handlers", "pickle")
print(sorted(m for m in unused if m in sys.modules))
maps = open("/proc/self/maps").read()
print("libssl" in maps, "libcrypto" in maps)
"""
    )
    assert out.splitlines() == ["[]", "False False"]


def test_what_the_stand_in_leaves_still_works() -> None:
    """uuid5 (the SMBIOS UUID) computes as before, and a later ``import ssl`` is the real one."""
    out = _python(
        SERVE_IMPORTS
        + """
import uuid
print(uuid.uuid5(uuid.NAMESPACE_DNS, "vmhost"))
import ssl
print(ssl.OPENSSL_VERSION.split()[0], ssl.create_default_context().check_hostname)
"""
    )
    expected = _python("import uuid; print(uuid.uuid5(uuid.NAMESPACE_DNS, 'vmhost'))")
    assert out.splitlines() == [expected.strip(), "OpenSSL True"]


def test_the_package_loads_its_names_on_use() -> None:
    """``import vmhost`` loads no client; ``vmhost.Client`` still is the client."""
    out = _python(
        """
import sys, vmhost
print("vmhost.client" in sys.modules)
from vmhost import Client
print(Client.__module__, "vmhost.client" in sys.modules)
"""
    )
    assert out.splitlines() == ["False", "vmhost.client True"]
