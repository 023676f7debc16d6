"""A network-namespace lab: separate "hosts" on one machine for multi-host tests.

How a lab is built (all of it as root, with ``ip`` from iproute2 and ``nft`` from nftables)::

    ns <lab>                       "the internet": one bridge br0, no address, no processes
      br0 ── v1 ─────── eth0  ns <lab>-alice     public host, 10.X.0.1/24
          ── v2 ─────── eth0  ns <lab>-bob       public host, 10.X.0.2/24
          ── v3 ─────── wan0  ns <lab>-home      NAT router, 10.X.0.3/24, ip_forward=1
                               br0 192.168.1.1/24 ── h1 ── eth0  ns <lab>-home-pc   192.168.1.2/24,
                                                                 default via 192.168.1.1

- ``<lab>`` is ``nl<pid>-<n>``: unique per process and lab, and checked against
  ``ip netns list`` so that a leftover of a crashed run with a recycled pid is
  never reused. Every namespace of a lab starts with that prefix. ``X`` is
  picked per lab; since each lab is a closed world, it only makes logs easier
  to tell apart.
- Nothing is created in the root namespace. Each veth pair is created from the
  bridge's (or router's) namespace with its peer put straight into the host's
  namespace under its final name (``ip -n <lab> link add v1 type veth peer name
  eth0 netns <lab>-alice``), so names never clash with the root's ``eth0`` and
  interface names stay short (the kernel allows 15 characters).
- Public hosts have ``lo`` up, one route to the internet subnet and a multicast
  route ``224.0.0.0/4 dev eth0`` (mDNS). They have no default route, so they
  have no route at all into a home subnet: a connection to a home host fails
  at once with "Network is unreachable", and one to the router's WAN address
  finds nothing listening there, as behind a real NAT.
- A NAT router has an nftables table ``ip nat`` with a ``postrouting`` chain
  holding ``oifname "wan0" masquerade`` (kind ``"eim"``: Linux keeps the
  source port when it is free, so one local port maps to one external port
  whatever the destination, an endpoint-independent mapping) or ``oifname
  "wan0" masquerade random`` (kind ``"symmetric"``: a fresh random external
  port per destination). Inbound filtering is Linux conntrack's: only replies
  from the exact remote address and port come back in.
- Hosts on one segment are one LAN, with no bootstrap needed for mDNS: all
  public hosts share the internet bridge, and the home hosts of one router
  share its LAN bridge.

Every process shares the machine's filesystem, but not its network: a service
on the root namespace's 127.0.0.1 (the session ``devchain`` anvil, say) is out
of reach from a host. Start such a service in a public host, bound to its
``address``; every host can reach that (home hosts through their NAT).

    with Lab(log_dir) as lab:
        chain = lab.public_host("chain")
        home = lab.nat_router("home", kind="eim").home_host("pc")
        proc = home.spawn([sys.executable, "-m", "node", "serve", ...], env={...})
        proc.wait_for_line(r"listening on (\\S+)", timeout=20)

The lab tears itself down on exit, on failure and on Ctrl-C: every process it
spawned gets SIGINT, then SIGKILL after a grace period, anything else left in
its namespaces is killed, and every namespace it made is deleted.
``unavailable_reason()`` says why a lab cannot be built here (not root, a tool
missing, namespaces refused), or None.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

NatKind = Literal["eim", "symmetric"]

_NETNS_DIR = Path("/run/netns")
_POLL_S = 0.02
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,29}")
_lab_counter = itertools.count(1)
_open_labs: set[Lab] = set()


class NetlabError(RuntimeError):
    """A command that builds or tears down the lab failed."""


class WaitFailed(AssertionError):
    """``Proc.wait_for_line`` gave up: the process exited, or the deadline passed."""


# ---------------------------------------------------------------- availability


@cache
def unavailable_reason() -> str | None:
    """Why a lab cannot be built on this machine, or None when it can.

    Checks root, ``ip`` and ``nft``, then builds and deletes a throwaway
    namespace holding a bridge, a veth pair and an nftables NAT table.
    """
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "ip not found: apt-get install iproute2"
    if shutil.which("nft") is None:
        return "nft not found: apt-get install nftables"
    probe = f"nlprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except NetlabError as e:
        return f"cannot create a network namespace: {e}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _nft(probe, "masquerade")
    except NetlabError as e:
        return f"cannot build a lab in a network namespace: {e}"
    finally:
        with contextlib.suppress(NetlabError):
            _ip("netns", "del", probe)
    return None


# ---------------------------------------------------------------- processes


class Proc:
    """A long-running process in a host, its stdout and stderr in files.

    It leads its own process group (``ip netns exec`` execs, so ``pid`` is the
    command itself), and signals go to the whole group, children included.
    """

    def __init__(self, popen: subprocess.Popen[bytes], label: str, stdout_path: Path, stderr_path: Path) -> None:
        self.popen = popen
        self.label = label
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal), else None."""
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit; raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        return self.popen.wait(timeout)

    def send_signal(self, sig: int = signal.SIGINT) -> None:
        """Signal its process group (SIGINT: what Ctrl-C in a terminal does)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self, grace: float = 3.0) -> int:
        """SIGINT, then SIGKILL if it is still running after ``grace`` seconds.

        Whatever is left of its process group afterwards is SIGKILLed too (and
        the lab's teardown kills anything still running in its namespaces).
        Returns the exit status; harmless on a process that has already exited.
        """
        if self.alive():
            self.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
            if self.alive():
                self.send_signal(signal.SIGKILL)
                self.popen.wait()
            self.send_signal(signal.SIGKILL)  # stragglers it left in its group, now, before the pid can be reused
        return self.popen.returncode

    def stdout(self) -> str:
        return _read_text(self.stdout_path)

    def stderr(self) -> str:
        return _read_text(self.stderr_path)

    def output(self) -> str:
        """Status, stdout and stderr in one string, for failure messages."""
        code = self.popen.poll()
        state = "running" if code is None else f"exited with {code}"
        return f"--- {self.label} (pid {self.pid}, {state})\n--- stdout\n{self.stdout()}--- stderr\n{self.stderr()}"

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float, stream: Literal["both", "stdout", "stderr"] = "both"
    ) -> re.Match[str]:
        """The first output line (from the start) matching ``pattern`` (``re.search``).

        Polls the output files every few milliseconds until ``timeout`` seconds
        have passed. Only complete lines count while the process runs (a port
        number half-written is not a match); its last unterminated line counts
        once it has exited. Raises ``WaitFailed`` with the output when the
        process exits or the deadline passes without a match.
        """
        regex = re.compile(pattern)
        paths = {"stdout": [self.stdout_path], "stderr": [self.stderr_path]}.get(
            stream, [self.stdout_path, self.stderr_path]
        )
        offsets = dict.fromkeys(paths, 0)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.popen.poll() is not None  # before reading: lines written before exit are all seen
            for path in paths:
                match, offsets[path] = _scan(path, offsets[path], regex, final=exited)
                if match:
                    return match
            if exited:
                raise WaitFailed(
                    f"{self.label} exited before printing a line matching {regex.pattern!r}\n{self.output()}"
                )
            if time.monotonic() >= deadline:
                raise WaitFailed(f"no line matching {regex.pattern!r} from {self.label} in {timeout}s\n{self.output()}")
            time.sleep(_POLL_S)


def _scan(path: Path, offset: int, regex: re.Pattern[str], final: bool) -> tuple[re.Match[str] | None, int]:
    """Search the complete lines of ``path`` from byte ``offset``; returns (match, next offset)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return None, offset
    end = len(data) if final else data.rfind(b"\n") + 1
    for line in data[:end].decode("utf-8", "replace").splitlines():
        if match := regex.search(line):
            return match, offset + end
    return None, offset + end


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


# ---------------------------------------------------------------- hosts


class NetHost:
    """One host: a network namespace with one address. It shares the machine's filesystem."""

    def __init__(self, lab: Lab, name: str, ns: str, address: str) -> None:
        self.lab = lab
        self.name = name
        self.ns = ns
        self.address = address

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.address} ns={self.ns}>"

    def exec_argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` prefixed so that it runs in this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *map(os.fspath, argv)]

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """``subprocess.run`` in this host: output captured as text unless ``kwargs`` say otherwise.

        ``env`` is added to (and overrides) this process's environment.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.exec_argv(argv), env=_environ(env), timeout=timeout, check=check, **kwargs)

    def spawn(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        label: str | None = None,
    ) -> Proc:
        """Start a long-running process in this host; the lab kills it on teardown.

        ``env`` is added to (and overrides) this process's environment. Its
        stdout and stderr go to ``<lab.log_dir>/<host>-<label>.out``/``.err``
        (label: the command's name, numbered when repeated). SIGINT is reset
        to its default for it (``env --default-signal=INT``, which execs too),
        since a test runner started in the background by a shell ignores
        SIGINT, and its children would inherit that.
        """
        self.lab._check_open()
        label = self.lab._log_label(f"{self.name}-{label or Path(os.fspath(argv[0])).name}")
        stdout_path = self.lab.log_dir / f"{label}.out"
        stderr_path = self.lab.log_dir / f"{label}.err"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                self.exec_argv(["env", "--default-signal=INT", *argv]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_environ(env),
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(popen, label, stdout_path, stderr_path)
        self.lab.procs.append(proc)
        return proc


class Router(NetHost):
    """A NAT router: ``wan0`` on the internet (``address``), a LAN bridge behind it."""

    def __init__(self, lab: Lab, name: str, ns: str, address: str, kind: NatKind, lan: ipaddress.IPv4Network) -> None:
        super().__init__(lab, name, ns, address)
        self.kind = kind
        self.lan = lan
        self.lan_address = str(lan[1])
        self.home_hosts: list[NetHost] = []

    def home_host(self, name: str) -> NetHost:
        """A host on this router's LAN, default route via the router: reachable only from that LAN."""
        address = str(self.lan[2 + len(self.home_hosts)])
        host = self.lab._add_host(f"{self.name}-{name}", hub_ns=self.ns, uplink="eth0", address=address, lan=self.lan)
        _ip("-n", host.ns, "route", "add", "default", "via", self.lan_address)
        self.home_hosts.append(host)
        self.lab.hosts.append(host)
        return host


# ---------------------------------------------------------------- the lab


class Lab:
    """A closed little internet of namespaces; see the module docstring.

    Use it as a context manager (or call ``close()``): teardown always runs,
    and a Ctrl-C during teardown is held back until it has finished.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, grace: float = 3.0) -> None:
        """Build the internet bridge. ``log_dir`` holds the processes' output (default: a new
        temporary directory); ``grace`` is how long teardown waits after SIGINT before SIGKILL."""
        self.prefix = _fresh_prefix()
        self.grace = grace
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        n = int(self.prefix.rsplit("-", 1)[1])
        self.internet = ipaddress.IPv4Network(f"10.{(os.getpid() + n) % 200 + 20}.0.0/24")
        self.namespaces: list[str] = []  # the internet's first
        self.hosts: list[NetHost] = []  # public and home hosts
        self.routers: list[Router] = []
        self.procs: list[Proc] = []  # every spawned process
        self._addresses = self.internet.hosts()
        self._veths = itertools.count(1)
        self._labels: set[str] = set()
        self._closed = False
        _open_labs.add(self)
        try:
            self._add_ns(self.prefix)
            _ip("-n", self.prefix, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.prefix, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def public_host(self, name: str) -> NetHost:
        """A host on the internet bridge with its own public ``address``."""
        host = self._add_host(name, hub_ns=self.prefix, uplink="eth0", address=self._next_address(), lan=self.internet)
        self.hosts.append(host)
        return host

    def nat_router(self, name: str, kind: NatKind = "eim") -> Router:
        """A NAT router on the internet bridge; add hosts behind it with ``router.home_host(name)``."""
        if kind not in ("eim", "symmetric"):
            raise ValueError(f"NAT kind {kind!r}: use 'eim' or 'symmetric'")
        lan = ipaddress.IPv4Network(f"192.168.{len(self.routers) + 1}.0/24")
        ns = self._ns_name(name)
        router = Router(self, name, ns, self._next_address(), kind, lan)
        self._add_ns(ns)
        self._link(self.prefix, ns, "wan0", router.address, self.internet)
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "addr", "add", f"{router.lan_address}/{lan.prefixlen}", "dev", "br0")
        _ip("-n", ns, "link", "set", "br0", "up")
        _ip("netns", "exec", ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        _nft(ns, "masquerade random" if kind == "symmetric" else "masquerade")
        self.routers.append(router)
        return router

    def close(self, grace: float | None = None) -> None:
        """Kill every process (SIGINT, SIGKILL after ``grace`` s) and delete every namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with _sigint_held():
            try:
                _kill_all(self.procs, self.grace if grace is None else grace)
            finally:
                for ns in reversed(self.namespaces):
                    _kill_ns_pids(ns)
                    with contextlib.suppress(NetlabError):
                        _ip("netns", "del", ns)
                _open_labs.discard(self)

    # ------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise NetlabError(f"lab {self.prefix} is closed")

    def _ns_name(self, name: str) -> str:
        self._check_open()
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"host name {name!r}: use 1-30 of a-z, 0-9 and '-'")
        ns = f"{self.prefix}-{name}"
        if ns in self.namespaces:
            raise ValueError(f"this lab already has a host named {name!r}")
        return ns

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _add_host(self, name: str, hub_ns: str, uplink: str, address: str, lan: ipaddress.IPv4Network) -> NetHost:
        host = NetHost(self, name, self._ns_name(name), address)
        self._add_ns(host.ns)
        self._link(hub_ns, host.ns, uplink, address, lan)
        _ip("-n", host.ns, "route", "add", "224.0.0.0/4", "dev", uplink)
        return host

    def _link(self, hub_ns: str, ns: str, ifname: str, address: str, lan: ipaddress.IPv4Network) -> None:
        """A veth from ``hub_ns``'s br0 to ``ns``, named ``ifname`` there, holding ``address``."""
        port = f"v{next(self._veths)}"
        _ip("-n", hub_ns, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
        _ip("-n", hub_ns, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/{lan.prefixlen}", "dev", ifname)
        _ip("-n", ns, "link", "set", ifname, "up")

    def _next_address(self) -> str:
        try:
            return str(next(self._addresses))
        except StopIteration:
            raise NetlabError(f"no address left on {self.internet}") from None

    def _log_label(self, base: str) -> str:
        label = base
        for n in itertools.count(2):
            if label not in self._labels:
                break
            label = f"{base}-{n}"
        self._labels.add(label)
        return label


def _fresh_prefix() -> str:
    """``nl<pid>-<n>``, skipping any n that a leftover namespace already uses."""
    existing = set(os.listdir(_NETNS_DIR)) if _NETNS_DIR.is_dir() else set()
    while True:
        prefix = f"nl{os.getpid()}-{next(_lab_counter)}"
        if not any(ns == prefix or ns.startswith(prefix + "-") for ns in existing):
            return prefix


def _kill_all(procs: Sequence[Proc], grace: float) -> None:
    """SIGINT every process, one shared grace period, then SIGKILL the rest and their groups."""
    for proc in procs:
        if proc.alive():
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    while any(p.alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    for proc in procs:
        proc.kill(grace=0)


def _kill_ns_pids(ns: str) -> None:
    """SIGKILL whatever still runs in ``ns`` (a daemon that left its process group, say)."""
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold back Ctrl-C while the block runs (main thread only), then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close(grace=1.0)


# ---------------------------------------------------------------- commands


def _ip(*args: str) -> None:
    _check(["ip", *args])


def _nft(ns: str, action: str) -> None:
    """Load the NAT table into ``ns``: ``oifname "wan0" <action>``."""
    rules = (
        "table ip nat {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "wan0" {action}\n'
        "  }\n"
        "}\n"
    )
    _check(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=rules)


def _check(argv: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetlabError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")


def _environ(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if extra is None else {**os.environ, **extra}


# ================================================================ market processes in the lab
#
# Helpers for running llmarket itself in a lab (tests/test_across_hosts.py; a benchmark may reuse them):
# `llmarket serve` (or tests/scripted_worker.py) in a host, its multiaddrs and reachability lines, one-shot
# commands in a host, and an anvil chain with the contracts deployed that every host reaches.
# Nothing above this line depends on them.

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
_MULTIADDR_LINE = r"^(/(?:ip4|ip6|dns4|dns6)/\S+/p2p/\S+)$"


def llmarket_argv(data_dir: str | os.PathLike[str], *args: str) -> list[str]:
    """``python -m node --data-dir DIR ARGS…`` (the ``llmarket`` command).

    ``request`` and ``gateway`` get ``--spot-check 0`` first (a later flag overrides it): a random spot check
    would add a verification job on some worker to a test about the network."""
    if args and args[0] in ("request", "gateway"):
        args = (args[0], "--spot-check", "0", *args[1:])
    return [PYTHON, "-m", "node", "--data-dir", os.fspath(data_dir), *args]


def scripted_worker_argv(data_dir: str | os.PathLike[str], *args: str) -> list[str]:
    """``python -m tests.scripted_worker --data-dir DIR ARGS…`` (a worker with a scripted engine)."""
    return [PYTHON, "-m", "tests.scripted_worker", "--data-dir", os.fspath(data_dir), *args]


def outputs(lab: Lab, tail: int = 6000) -> str:
    """The output of every process the lab spawned (the last ``tail`` characters of each), for failure messages."""
    parts = []
    for proc in lab.procs:
        text = proc.output()
        parts.append(text if len(text) <= tail else f"[… {len(text) - tail} characters cut]\n{text[-tail:]}")
    return "\n".join(parts)


@dataclass
class MarketNode:
    """A long-running llmarket node (``serve``, or the scripted worker) in a host, once it printed its multiaddrs."""

    host: NetHost
    proc: Proc
    data_dir: Path
    addrs: list[str]  # what it printed after "bootstrap others with:", ``…/p2p/<peer id>``

    @property
    def peer_id(self) -> str:
        return self.addrs[0].rsplit("/p2p/", 1)[1]

    @property
    def multiaddr(self) -> str:
        """The address others in the lab bootstrap from: the one on the host's own address, else the first."""
        return next((a for a in self.addrs if f"/{self.host.address}/" in a), self.addrs[0])

    def wait_reachability(self, pattern: str = r"^reachable: ", timeout: float = 60) -> str:
        """The first reachability line matching ``pattern`` (``public`` / ``behind NAT, through relay …``)."""
        return self.proc.wait_for_line(pattern, timeout, stream="stderr").group(0)

    def wait_public(self, timeout: float = 60) -> str:
        return self.wait_reachability(r"^reachable: public ", timeout)

    def wait_relayed(self, timeout: float = 60) -> str:
        """Waits for "reachable: behind NAT, through relay <relay addr>/p2p-circuit/p2p/<us>"; returns that address."""
        line = self.wait_reachability(r"^reachable: behind NAT, through relay (\S+/p2p-circuit/p2p/\S+)$", timeout)
        return line.rsplit(" ", 1)[1]

    def job_lines(self) -> list[str]:
        """Its log lines about jobs ("job <id> from <peer>…: accepted (… connection)", "job <id>: done, …")."""
        return [line for line in self.proc.stderr().splitlines() if re.search(r"\bjob [0-9a-f]+\b", line)]

    def net_status(self) -> dict | None:
        """What it last wrote to ``net-status.json`` in its data dir (every 5 s), or None before the first."""
        return _read_json(self.data_dir / "net-status.json")

    def wait_net_status(self, predicate, timeout: float, what: str) -> dict:
        """Poll ``net-status.json`` until ``predicate(status)``; raises ``WaitFailed`` with the output."""
        return self._poll(lambda: (s := self.net_status()) is not None and predicate(s) and s, timeout, what)

    def book(self) -> list[dict]:
        """The live offers in a scripted worker's book (its ``offers.json``; [] before the first). Not ``serve``."""
        return _read_json(self.data_dir / "offers.json") or []

    def wait_for_offer(self, peer_id: str, predicate=lambda offer: True, timeout: float = 60) -> dict:
        """Poll a scripted worker's book until it holds an offer of ``peer_id`` that satisfies ``predicate``."""

        def found():
            return next((o for o in self.book() if o["peer_id"] == peer_id and predicate(o)), None)

        return self._poll(found, timeout, f"offer of {peer_id} as wanted in {self.proc.label}'s book")

    def _poll(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if not self.proc.alive():
                raise WaitFailed(f"{self.proc.label} exited while waiting for {what}\n{self.proc.output()}")
            if time.monotonic() >= deadline:
                raise WaitFailed(f"no {what} within {timeout}s\n{self.proc.output()}")
            time.sleep(0.05)  # polling interval: the files are rewritten every 0.5 s (book) or 5 s (status)
        return value

    def connection_to(self, peer_id: str) -> str | None:
        """ "direct", "relayed" or None: how it is connected to ``peer_id``, as its net-status.json last said."""
        status = self.net_status() or {}
        return next((p["connection"] for p in status.get("peers", []) if p["peer_id"] == peer_id), None)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # not written yet (files are replaced whole, never half-written)
        return None


def start_node(
    host: NetHost, argv: Sequence[str], data_dir: str | os.PathLike[str], *, label: str, timeout: float = 120
) -> MarketNode:
    """Spawn a node in ``host`` and wait until it printed its multiaddrs (the one on the host's address last).

    ``argv`` is ``llmarket_argv(data_dir, "serve", …)`` or ``scripted_worker_argv(data_dir, …)``. A node listening
    on ``0.0.0.0`` prints an address on each interface, the host's own among them; the wait is for that line,
    so every line before it has been printed too.
    """
    proc = host.spawn(argv, cwd=REPO_ROOT, label=label)
    own = re.escape(host.address)
    proc.wait_for_line(rf"^/ip4/{own}/\S+/p2p/\S+$", timeout, stream="stdout")
    addrs = [line for line in proc.stdout().splitlines() if re.match(_MULTIADDR_LINE, line)]
    return MarketNode(host, proc, Path(data_dir), addrs)


def start_serve(host: NetHost, data_dir: str | os.PathLike[str], *args: str, timeout: float = 120) -> MarketNode:
    """``llmarket serve ARGS…`` in ``host`` (the real model), once it serves."""
    return start_node(host, llmarket_argv(data_dir, "serve", *args), data_dir, label="serve", timeout=timeout)


def start_scripted_worker(
    host: NetHost, data_dir: str | os.PathLike[str], *args: str, timeout: float = 60
) -> MarketNode:
    """``tests.scripted_worker ARGS…`` in ``host``, once it serves."""
    return start_node(host, scripted_worker_argv(data_dir, *args), data_dir, label="scripted", timeout=timeout)


def run_to_end(host: NetHost, argv: Sequence[str], *, timeout: float, label: str) -> Proc:
    """Spawn a one-shot command in ``host`` and wait for it to exit (its output stays in the lab's logs).

    Raises ``WaitFailed`` with its output if it is still running after ``timeout`` seconds (it is killed).
    """
    proc = host.spawn(argv, cwd=REPO_ROOT, label=label)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise WaitFailed(f"{label} did not finish within {timeout}s\n{proc.output()}") from None
    return proc


def json_output(proc: Proc) -> Any:
    """The JSON a finished ``--json`` command printed; ``WaitFailed`` with its output if it failed or printed none."""
    if proc.returncode != 0:
        raise WaitFailed(f"{proc.label} failed\n{proc.output()}")
    try:
        return json.loads(proc.stdout())
    except ValueError:
        raise WaitFailed(f"{proc.label} printed no JSON\n{proc.output()}") from None


# ---------------------------------------------------------------- a chain every host reaches

_CHAIN_TOOL = r"""
import json, sys, time
from pathlib import Path
from eth_account import Account
from web3 import HTTPProvider, Web3
from node.payments.deployment import deploy_contracts, write_deployment
from node.payments.deposits import DepositClient

cmd = json.loads(sys.argv[1])
w3 = Web3(HTTPProvider(cmd["rpc_url"]))
out = {}
if cmd["op"] == "deploy":
    keys = json.loads(Path(cmd["accounts_file"]).read_text())["private_keys"]
    deployer = Account.from_key(keys[0])
    deployment = deploy_contracts(w3, deployer.address)  # anvil's dev accounts are unlocked
    write_deployment(deployment, Path(cmd["deployments"]))
    owner = DepositClient(w3, deployment, deployer)
    for address, tokens, wei in cmd["fund"]:
        if wei:
            w3.provider.make_request("anvil_setBalance", [address, hex(wei)])
        if tokens:
            owner.send(owner.token.functions.transfer(address, tokens), "fund " + address)
    out = deployment.to_json()
else:
    client = DepositClient.connect(cmd["rpc_url"], deployments_dir=Path(cmd["deployments"]))
    deadline = time.monotonic() + cmd.get("timeout", 0)
    while True:
        out = {a: client.token_balance(a) for a in cmd["addresses"]}
        low = {a: n for a, n in cmd.get("at_least", {}).items() if out[a] < n}
        if not low or time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # polling interval: a worker's claim is one transaction after its job
print(json.dumps(out))
"""


@dataclass
class LabChain:
    """anvil in a public host, bound to the host's address, with LLMToken and the DepositEscrow deployed.

    Every host reaches ``rpc_url`` (home hosts through their NAT); the deployment record is in
    ``deployments`` (the filesystem is shared), as ``--deployments DIR`` wants it. Calls to the chain from
    the test (``balances``) run as a short Python process in the chain's host: the test's own network
    namespace cannot reach the lab.
    """

    host: NetHost
    proc: Proc
    rpc_url: str
    deployments: Path
    deployment: dict  # the deployment record: chainId, token, deposits, block, deployer
    chain_id: int = 31337

    def _tool(self, command: dict, timeout: float) -> Any:
        command = {"rpc_url": self.rpc_url, "deployments": os.fspath(self.deployments), **command}
        result = self.host.run([PYTHON, "-c", _CHAIN_TOOL, json.dumps(command)], cwd=REPO_ROOT, timeout=timeout)
        if result.returncode != 0:
            raise NetlabError(f"chain tool {command['op']} failed: {result.stderr.strip()[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def balances(
        self, *addresses: str, at_least: Mapping[str, int] | None = None, timeout: float = 0
    ) -> dict[str, int]:
        """Token balances of ``addresses``; with ``at_least``, polled until each reaches it or ``timeout`` passes."""
        command = {"op": "balances", "addresses": list(addresses), "at_least": dict(at_least or {}), "timeout": timeout}
        return self._tool(command, timeout=timeout + 60)


def start_chain(
    host: NetHost,
    workdir: str | os.PathLike[str],
    *,
    fund: Sequence[tuple[str, int, int]] = (),
    port: int = 8545,
    timeout: float = 60,
) -> LabChain:
    """anvil on ``host.address:port`` (chain 31337), the contracts deployed, and ``fund`` paid out.

    ``fund`` is ``(address, token base units, wei)`` triples: tokens from the deployer, ETH set with
    ``anvil_setBalance`` (workers need ETH to pay for their claims).
    """
    from node.dev.devchain import find_anvil  # the node's dependencies load only for market tests

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    accounts_file = workdir / "anvil-accounts.json"
    argv = [find_anvil(), "--host", host.address, "--port", str(port), "--chain-id", "31337", "--accounts", "2",
            "--config-out", os.fspath(accounts_file)]  # fmt: skip
    proc = host.spawn(argv, label="anvil")
    proc.wait_for_line(rf"Listening on {re.escape(host.address)}:{port}", timeout)
    chain = LabChain(host, proc, f"http://{host.address}:{port}", workdir / "deployments", {})
    deadline = time.monotonic() + timeout
    while not accounts_file.exists():  # anvil writes it as it starts listening
        if time.monotonic() >= deadline:
            raise WaitFailed(f"anvil wrote no {accounts_file}\n{proc.output()}")
        time.sleep(_POLL_S)
    command = {"op": "deploy", "accounts_file": os.fspath(accounts_file), "fund": [list(f) for f in fund]}
    chain.deployment = chain._tool(command, timeout=timeout + 60)
    return chain
