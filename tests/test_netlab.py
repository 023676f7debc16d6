"""The network-namespace lab (tests/netlab.py) gives real separate hosts and real NATs.

Tiny Python socket programs run in the hosts: a TCP server answers each
connection with the address it sees the client at, a UDP server answers each
datagram the same way, and clients print what they were told (or why they
failed).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .netlab import Lab, NetHost, Proc, WaitFailed

pytestmark = pytest.mark.netns

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

TCP_SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen()
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    conn.sendall(f"{peer[0]}:{peer[1]}\\n".encode())
    conn.close()
"""

TCP_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as conn:
        print("seen-as", conn.makefile().readline().strip())
except OSError as e:
    print("failed", type(e).__name__, e.strerror or e)
"""

UDP_SERVER = """
import socket, sys
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    data, peer = server.recvfrom(100)
    server.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
"""

# argv: server port, then local ports; for each local port one line: the endpoints each server saw
UDP_CLIENT = """
import socket, sys
port, servers = int(sys.argv[1]), sys.argv[2].split(",")
for local_port in sys.argv[3:]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", int(local_port)))
    sock.settimeout(2)
    seen = []
    for server in servers:
        sock.sendto(b"who am i", (server, port))
        seen.append(sock.recvfrom(100)[0].decode())
    print(" ".join(seen))
"""


def tcp_server(host: NetHost, bind: str, port: int) -> Proc:
    proc = host.spawn([PY, "-c", TCP_SERVER, bind, str(port)], label=f"tcp{port}")
    proc.wait_for_line("^listening$", timeout=10)
    return proc


def tcp_connect(host: NetHost, address: str, port: int) -> str:
    """What a TCP client in ``host`` gets: "seen-as IP:PORT" or "failed <error>"."""
    result = host.run([PY, "-c", TCP_CLIENT, address, str(port)], check=True)
    return result.stdout.strip()


def external_endpoints(home: NetHost, servers: list[NetHost], local_ports: list[int]) -> list[list[str]]:
    """For each local UDP port of ``home``: the IP:PORT each of ``servers`` saw it at."""
    for server in servers:
        server.spawn([PY, "-c", UDP_SERVER, server.address, "9000"], label="udp").wait_for_line("^listening$", 10)
    addresses = ",".join(s.address for s in servers)
    result = home.run([PY, "-c", UDP_CLIENT, "9000", addresses, *map(str, local_ports)], check=True)
    return [line.split() for line in result.stdout.splitlines()]


def test_public_hosts_reach_each_other_and_no_other_loopback(lab: Lab):
    alice, bob = lab.public_host("alice"), lab.public_host("bob")
    assert alice.address != bob.address
    tcp_server(alice, alice.address, 7000)
    tcp_server(alice, "127.0.0.1", 7001)

    assert tcp_connect(bob, alice.address, 7000).startswith(f"seen-as {bob.address}:")
    assert tcp_connect(alice, bob.address, 7000).startswith("failed ConnectionRefusedError")
    # each host has its own loopback: alice's is up and hers alone
    assert tcp_connect(alice, "127.0.0.1", 7001).startswith("seen-as 127.0.0.1:")
    assert tcp_connect(bob, "127.0.0.1", 7001).startswith("failed ConnectionRefusedError")
    # and the root namespace's loopback (this test process's) is out of reach
    with socket.create_server(("127.0.0.1", 0)) as root_service:
        port = root_service.getsockname()[1]
        assert tcp_connect(alice, "127.0.0.1", port).startswith("failed ConnectionRefusedError")


def test_home_host_reaches_public_host_as_the_router(lab: Lab):
    server = lab.public_host("server")
    router = lab.nat_router("home", kind="eim")
    pc = router.home_host("pc")
    assert pc.address != router.address
    tcp_server(server, server.address, 7000)

    assert tcp_connect(pc, server.address, 7000).startswith(f"seen-as {router.address}:")


def test_public_host_cannot_connect_to_a_home_host(lab: Lab):
    outsider = lab.public_host("outsider")
    router = lab.nat_router("home", kind="eim")
    pc, laptop = router.home_host("pc"), router.home_host("laptop")
    tcp_server(pc, "0.0.0.0", 7000)

    # the server is up and its LAN reaches it...
    assert tcp_connect(laptop, pc.address, 7000).startswith(f"seen-as {laptop.address}:")
    # ...but from outside there is no route in, and nothing is forwarded at the router
    assert tcp_connect(outsider, pc.address, 7000).startswith("failed")
    assert tcp_connect(outsider, router.address, 7000).startswith("failed ConnectionRefusedError")


def test_eim_nat_keeps_one_external_port_per_local_port(lab: Lab):
    servers = [lab.public_host("s1"), lab.public_host("s2")]
    router = lab.nat_router("home", kind="eim")
    pc = router.home_host("pc")

    for seen_by_s1, seen_by_s2 in external_endpoints(pc, servers, [40000, 40001]):
        assert seen_by_s1 == seen_by_s2
        assert seen_by_s1.startswith(f"{router.address}:")


def test_symmetric_nat_maps_each_destination_to_its_own_port(lab: Lab):
    servers = [lab.public_host("s1"), lab.public_host("s2")]
    router = lab.nat_router("home", kind="symmetric")
    pc = router.home_host("pc")

    seen = external_endpoints(pc, servers, [40000, 40001, 40002, 40003, 40004])
    assert all(endpoint.startswith(f"{router.address}:") for pair in seen for endpoint in pair)
    assert any(seen_by_s1 != seen_by_s2 for seen_by_s1, seen_by_s2 in seen), seen


MDNS_LISTENER = """
import socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("224.0.0.251", 5353))
membership = struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton(sys.argv[1]))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
print("joined", flush=True)
while True:
    data, peer = sock.recvfrom(100)
    print("got", data.decode(), "from", peer[0], flush=True)
"""

MDNS_SENDER = """
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    sock.sendto(b"hello", ("224.0.0.251", 5353))
"""


def test_multicast_reaches_the_hosts_of_one_segment_only(lab: Lab):
    alice, bob = lab.public_host("alice"), lab.public_host("bob")
    pc = lab.nat_router("home").home_host("pc")
    on_bob, on_pc = (host.spawn([PY, "-c", MDNS_LISTENER, host.address], label="mdns") for host in (bob, pc))
    for listener in (on_bob, on_pc):
        listener.wait_for_line("^joined$", timeout=10)

    alice.run([PY, "-c", MDNS_SENDER], check=True)

    on_bob.wait_for_line(rf"^got hello from {alice.address}$", timeout=5)
    assert "got" not in on_pc.stdout()  # the home LAN is another segment


def test_wait_for_line_polls_complete_lines_and_reports_exits(lab: Lab):
    host = lab.public_host("alice")
    script = "import signal, sys; print('ready'); print('port 123', end=''); sys.stdout.flush(); signal.pause()"
    proc = host.spawn([PY, "-c", script])
    assert proc.wait_for_line(r"^read(y)$", timeout=10).group(1) == "y"
    with pytest.raises(WaitFailed, match="no line matching"):
        proc.wait_for_line(r"port \d+", timeout=0.2)  # half a line is not a line yet
    assert proc.kill() == -signal.SIGINT
    assert proc.wait_for_line(r"port (\d+)", timeout=1).group(1) == "123"  # it is once the process is gone

    quitter = host.spawn([PY, "-c", "import sys; sys.exit('bye')"])
    started = time.monotonic()
    with pytest.raises(WaitFailed, match="exited") as failure:
        quitter.wait_for_line("never", timeout=30)
    assert time.monotonic() - started < 10
    assert "bye" in str(failure.value)
    assert quitter.wait_for_line("^bye$", timeout=1, stream="stderr")


LEAVES_ITS_GROUP = """
import os, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"], start_new_session=True)
print("child", child.pid, flush=True)
signal.pause()
"""


def netns_names() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def gone(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"


def test_teardown_kills_every_process_and_deletes_every_namespace(netns_available, tmp_path):
    with pytest.raises(RuntimeError, match="test failed"), Lab(tmp_path, grace=0.5) as lab:
        alice = lab.public_host("alice")
        pc = lab.nat_router("home", kind="symmetric").home_host("pc")
        # "ready" first: a SIGINT that lands while Python is still starting up
        # ends it with exit status 1 (a KeyboardInterrupt in its own imports),
        # not by the signal, and a loaded CI machine can be that slow.
        polite = alice.spawn([PY, "-c", "import signal; print('ready', flush=True); signal.pause()"])
        stubborn = pc.spawn([PY, "-c", LEAVES_ITS_GROUP])
        polite.wait_for_line(r"^ready$", timeout=10)
        child = int(stubborn.wait_for_line(r"^child (\d+)$", timeout=10).group(1))
        assert set(lab.namespaces) <= netns_names()
        assert len(lab.namespaces) == 4  # the internet, alice, the router, pc
        raise RuntimeError("test failed")

    assert not set(lab.namespaces) & netns_names()
    assert not any(ns.startswith(lab.prefix) for ns in netns_names())
    assert polite.returncode == -signal.SIGINT
    assert stubborn.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(child), "a process that left its group outlived the lab"


CTRL_C_DRIVER = """
import signal, sys
from tests.netlab import Lab
with Lab(sys.argv[1], grace=0.5) as lab:
    host = lab.public_host("alice")
    proc = host.spawn([sys.executable, "-c", "import signal; signal.pause()"])
    print("ready", lab.prefix, proc.pid, flush=True)
    signal.pause()
"""


def test_ctrl_c_tears_the_lab_down(netns_available, tmp_path):
    out, err = tmp_path / "driver.out", tmp_path / "driver.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        popen = subprocess.Popen(
            ["env", "--default-signal=INT", PY, "-c", CTRL_C_DRIVER, str(tmp_path / "logs")],
            cwd=REPO_ROOT,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    driver = Proc(popen, "driver", out, err)
    try:
        prefix, pid = driver.wait_for_line(r"^ready (\S+) (\d+)$", timeout=20).groups()
        assert any(ns.startswith(prefix) for ns in netns_names())
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=10)
    finally:
        driver.kill()
    assert "KeyboardInterrupt" in driver.stderr(), driver.output()
    assert not any(ns == prefix or ns.startswith(prefix + "-") for ns in netns_names())
    assert gone(int(pid))
