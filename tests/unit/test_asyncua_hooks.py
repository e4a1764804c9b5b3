"""gateway.asyncua_hooks: every asyncua patch in place after install(), once, and only on asyncua 2.1.0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway import asyncua_hooks
from gateway.asyncua_hooks import ASYNCUA_VERSION, AsyncuaVersionError, check_version


def test_another_asyncua_version_is_refused_in_one_line():
    check_version(ASYNCUA_VERSION)
    with pytest.raises(AsyncuaVersionError) as refused:
        check_version("2.2.0")
    message = str(refused.value)
    assert "\n" not in message and "asyncua 2.2.0 is installed" in message and ASYNCUA_VERSION in message
    assert refused.value.exit_code == 2  # a CliError: `cmcs run` prints it as one line


def test_install_puts_every_patch_in_place_once():
    # a fresh interpreter: nothing installed before install(), everything after, and twice is once
    code = ("from gateway import asyncua_hooks as h\n"
            "assert not any(h.installed().values()), h.installed()\n"
            "h.install()\n"
            "from asyncua.server.internal_session import InternalSession\n"
            "first = InternalSession.call\n"
            "h.install()\n"
            "assert InternalSession.call is first\n"
            "print(sorted(k for k, v in h.installed().items() if v))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(asyncua_hooks.installed()))
    assert len(asyncua_hooks.installed()) == 9
