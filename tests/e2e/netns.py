"""Several hosts on one machine: Linux network namespaces on one bridge.

``Lan`` makes a namespace for the LAN itself, holding a bridge, and one namespace per
host, each joined to the bridge by a veth pair (``eth0`` on the host's side, the host's
name on the bridge's side) with an address of its own on a private /24. The machine's
own network namespace is never touched: every link lives in a namespace made here, so
deleting those namespaces removes every link too.

Code runs on a host in two ways: a child process through ``ip netns exec NS ...``
(``Host.launcher``), or a call in this process through ``Host.call``, which runs it on
a thread that has entered the host's namespace (``setns`` changes the network
namespace of the calling thread only), so that the sockets it opens are the host's.
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PREFIX = "pgmh"  # every namespace made here is named PREFIX<pid>n<count>-<name>
_lans = itertools.count()
CLONE_NEWNET = 0x40000000
TCP_LISTEN = "0A"


class Unavailable(Exception):
    """Namespaces cannot be made here; the message says why."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def _make(*args: str) -> None:
    """An ``ip`` command that builds the hosts: its failure means they cannot be built."""
    out = ip(*args, check=False)
    if out.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


def namespaces() -> list[str]:
    """The names of the machine's named network namespaces."""
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete namespaces that an earlier run, killed before it could clean up, left."""
    pattern = re.compile(rf"{PREFIX}(\d+)-")
    for name in namespaces():
        match = pattern.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            ip("netns", "delete", name, check=False)


def check_available() -> None:
    """Raise ``Unavailable`` where namespaces and links cannot be made."""
    if not sys.platform.startswith("linux"):
        raise Unavailable("network namespaces need Linux")
    if shutil.which("ip") is None:
        raise Unavailable("iproute2's `ip` command is not installed")
    if os.geteuid() != 0:
        raise Unavailable("creating network namespaces needs root")


def _enter(ns: str) -> None:
    """Move the calling thread into network namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Where `ip netns add` mounts a namespace (/var/run is /run on current systems).
    path = next(p for p in (Path("/run/netns"), Path("/var/run/netns")) if (p / ns).exists())
    fd = os.open(path / ns, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {ns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class Host:
    """One host: its namespace, its address and its port on the bridge."""

    def __init__(self, lan: Lan, name: str, ns: str, address: str) -> None:
        self.lan = lan
        self.name = name
        self.ns = ns
        self.ip = address
        self.bridge_port = name  # the bridge's end of the host's veth, in the LAN's namespace
        self._thread = ThreadPoolExecutor(1, f"netns-{name}", initializer=_enter, initargs=(ns,))

    @property
    def launcher(self) -> list[str]:
        """Prefix of a command line that runs this interpreter on the host."""
        return ["ip", "netns", "exec", self.ns, sys.executable]

    def call(self, fn: Callable[..., T], *args: object, timeout: float = 60.0) -> T:
        """``fn(*args)`` on a thread inside the host's network namespace."""
        return self._thread.submit(fn, *args).result(timeout)

    def get(self, url: str, timeout: float = 5.0) -> str:
        """The body of an HTTP GET sent from this host."""

        def fetch() -> str:
            # Never through a proxy from the environment: the address is on the bridge.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=timeout) as response:
                return response.read().decode()

        return self.call(fetch, timeout=timeout + 5)

    def listening(self) -> list[str]:
        """Every listening TCP address (IPv4 and IPv6) in the host's namespace."""
        return self.call(_listening)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _listening() -> list[str]:
    """Listening TCP sockets of the calling thread's network namespace."""
    found = []
    for table in ("tcp", "tcp6"):
        # /proc/thread-self/net: the namespace of this thread, not of the process.
        path = Path("/proc/thread-self/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != TCP_LISTEN:
                continue
            hex_addr, hex_port = fields[1].split(":")
            found.append(f"{_address(hex_addr)}:{int(hex_port, 16)}")
    return found


def _address(hex_addr: str) -> str:
    """An address as /proc/net/tcp{,6} shows it: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(hex_addr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    # An IPv6 socket bound to an IPv4 address (as gRPC binds) shows it IPv4-mapped.
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class Lan:
    """A bridge in a namespace of its own, and hosts attached to it.

    ``close()`` (or leaving it as a context manager) deletes every namespace it made, and
    with them every veth pair and the bridge.
    """

    def __init__(self, subnet: str = "10.213.7") -> None:
        self.tag = f"{PREFIX}{os.getpid()}n{next(_lans)}"
        self.subnet = subnet
        self.made: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.ns = ""

    def _switch(self) -> str:
        """The LAN's namespace and its bridge, made on first use."""
        if not self.ns:
            self.ns = self._namespace("lan")
            _make("-n", self.ns, "link", "set", "lo", "up")
            _make("-n", self.ns, "link", "add", "br0", "type", "bridge")
            _make("-n", self.ns, "link", "set", "br0", "up")
            # `ip netns exec` needs more than `ip netns add` (a mount namespace, sysfs).
            out = ip("netns", "exec", self.ns, "true", check=False)
            if out.returncode != 0:
                raise Unavailable(f"`ip netns exec {self.ns}` failed: {out.stderr.strip()}")
        return self.ns

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        out = ip("netns", "add", ns, check=False)
        if out.returncode != 0:
            raise Unavailable(f"`ip netns add {ns}` failed: {out.stderr.strip()}")
        self.made.append(ns)
        return ns

    def add(self, name: str) -> Host:
        """A new host ``name`` (at most 15 characters: it names its port on the bridge)."""
        assert len(name) <= 15 and name not in self.hosts
        self._switch()
        ns = self._namespace(name)
        address = f"{self.subnet}.{len(self.hosts) + 2}"
        _make(
            "-n", self.ns, "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", ns
        )
        _make("-n", self.ns, "link", "set", name, "master", "br0")
        _make("-n", self.ns, "link", "set", name, "up")
        _make("-n", ns, "link", "set", "lo", "up")
        _make("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _make("-n", ns, "link", "set", "eth0", "up")
        host = Host(self, name, ns, address)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Pull the host's cable at the switch: its bridge port goes down."""
        ip("-n", self.ns, "link", "set", host.bridge_port, "down")

    def mend(self, host: Host) -> None:
        """Plug it in again."""
        ip("-n", self.ns, "link", "set", host.bridge_port, "up")

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        errors = []
        for ns in reversed(self.made):
            out = ip("netns", "delete", ns, check=False)
            if out.returncode != 0 and ns in namespaces():
                errors.append(f"{ns}: {out.stderr.strip()}")
        self.made.clear()
        if errors:
            raise RuntimeError("namespaces left behind: " + "; ".join(errors))

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def left(self) -> list[str]:
        """This run's namespaces that still exist."""
        return [ns for ns in namespaces() if ns.startswith(f"{self.tag}-")]
