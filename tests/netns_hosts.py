"""Test hosts of the tests' own: a network namespace behind a veth pair, with servers in it.

The host side of the pair has 10.231.0.1/24 (a private range: denied to
executions by default) and 198.51.100.1/24 (TEST-NET-2, public-looking:
allowed); the namespace side has .2 of each. Inside run an HTTP server on
ports 80 and 8080 that answers with the address it was reached at and
counts its requests, and a DNS server on port 53 that resolves NAME to
198.51.100.2. Nothing here sends traffic anywhere else, and `remove` takes
it all down.
"""

import secrets
import subprocess
import sys
import time
from dataclasses import dataclass

import requests

PRIVATE, PUBLIC = "10.231.0.2", "198.51.100.2"
NAME = "api.wfd-test.example"
SERVER = r'''
import socket, struct, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

hits = []

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/hits":
            hits.append(self.client_address[0])
        body = (str(len(hits)) if self.path == "/hits"
                else f"hello from {self.server.server_address[1]}").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def dns(name, answer):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 53))
    wanted = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    while True:
        query, peer = sock.recvfrom(512)
        question = query[12:]
        end = question.index(b"\0") + 5
        qname, qtype = question[:end - 4], struct.unpack("!H", question[end - 4:end - 2])[0]
        found = qname.lower() == wanted and qtype == 1
        flags = 0x8180 if found or qname.lower() == wanted else 0x8183
        header = query[:2] + struct.pack("!HHHHH", flags, 1, int(found), 0, 0)
        record = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(answer)
                  if found else b"")
        sock.sendto(header + question[:end] + record, peer)

for port in (80, 8080):
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Thread(target=dns, args=(sys.argv[1], sys.argv[2]), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
'''


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class TestHosts:
    namespace: str
    host_side: str
    server: subprocess.Popen

    def hits(self) -> int:
        """Requests the HTTP server has answered (asked from the host, not through wfd)."""
        return int(requests.get(f"http://{PUBLIC}/hits", timeout=5).text)

    def remove(self) -> None:
        self.server.stdin.close()
        self.server.kill()
        self.server.wait(10)
        subprocess.run(["ip", "link", "del", self.host_side], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=10)


def create() -> TestHosts:
    """Make the namespace, the veth pair and the servers; wait until they answer."""
    tag = secrets.token_hex(3)
    namespace, host_side, inside = f"wfd-test-{tag}", f"wfdh{tag}", f"wfdn{tag}"
    _ip("netns", "add", namespace)
    try:
        _ip("link", "add", host_side, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        for address in ("10.231.0.1/24", "198.51.100.1/24"):
            _ip("addr", "add", address, "dev", host_side)
        _ip("link", "set", host_side, "up")
        for address in (f"{PRIVATE}/24", f"{PUBLIC}/24"):
            _ip("-n", namespace, "addr", "add", address, "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-I", "-c", SERVER, NAME, PUBLIC],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    except BaseException:
        subprocess.run(["ip", "link", "del", host_side], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
        raise
    hosts = TestHosts(namespace, host_side, server)
    try:
        assert server.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while True:  # the veth may take a moment to pass traffic (DAD, carrier)
            try:
                hosts.hits()
                return hosts
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    except BaseException:
        hosts.remove()
        raise
