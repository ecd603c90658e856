#!/usr/bin/env python3
"""Tries to reach addresses on port 80, for the egress tests
(tests/src/netns.rs): run by jobs, and by the tests themselves as root or
as a given uid. Standard library only; any Python 3 will do.

Usage: net_probe.py OUT PREFIX [NAME KIND HOST]...

KIND is one of
  tcp          connect, send "PREFIX-NAME", expect "ok PREFIX-NAME" back
  udp-sendto   an unconnected socket: sendto, then expect the answer
  udp-connect  connect the socket, send, expect the answer

OUT ("-" for stdout) gets "name=value" lines: uid, cgroup (the cgroup v2
path of this process), netns and interfaces first, then one line per
probe: "NAME=ok", or "NAME=failed:WHY" where WHY is the errno's name
(EPERM, ECONNREFUSED, ...), "timeout", or what came back instead.
"""

import errno
import os
import socket
import sys

PORT = 80
TIMEOUT_S = 3
IP_RECVERR = 11
IPV6_RECVERR = 25


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def recv_errors(sock, family):
    # An unconnected UDP socket hears of an ICMP error (a reject) only
    # with RECVERR on; without it a rejected datagram costs the timeout.
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def expect(reply, token):
    got = reply.decode("utf-8", "replace").strip()
    return "ok" if got == f"ok {token}" else f"failed:reply {got!r}"


def tcp(host, token):
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT_S)
        s.connect((host, PORT))
        s.sendall(f"{token}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            reply += chunk
        return expect(reply, token)


def udp(host, token, connected):
    family = family_of(host)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT_S)
        recv_errors(s, family)
        if connected:
            s.connect((host, PORT))
            s.send(token.encode())
        else:
            s.sendto(token.encode(), (host, PORT))
        reply, _ = s.recvfrom(512)
        return expect(reply, token)


def probe(kind, host, token):
    try:
        if kind == "tcp":
            return tcp(host, token)
        if kind == "udp-sendto":
            return udp(host, token, connected=False)
        if kind == "udp-connect":
            return udp(host, token, connected=True)
        return f"failed:unknown kind {kind}"
    except socket.timeout:
        return "failed:timeout"
    except OSError as e:
        return "failed:" + errno.errorcode.get(e.errno, str(e.errno))


def info():
    lines = [f"uid={os.getuid()}"]
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            v2 = [l.strip()[3:] for l in f if l.startswith("0::")]
        lines.append(f"cgroup={v2[0] if v2 else ''}")
    except OSError as e:
        lines.append(f"cgroup=unreadable {e}")
    try:
        lines.append(f"netns={os.readlink('/proc/self/ns/net')}")
    except OSError as e:
        lines.append(f"netns=unreadable {e}")
    lines.append("interfaces=" + " ".join(sorted(n for _, n in socket.if_nameindex())))
    return lines


def main():
    out, prefix, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if len(rest) % 3:
        sys.exit("probes come as NAME KIND HOST triples")
    lines = info()
    for i in range(0, len(rest), 3):
        name, kind, host = rest[i : i + 3]
        lines.append(f"{name}={probe(kind, host, f'{prefix}-{name}')}")
    text = "".join(line + "\n" for line in lines)
    if out == "-":
        sys.stdout.write(text)
    else:
        # Written whole, then renamed: the test never reads half of it.
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.rename(out + ".tmp", out)


if __name__ == "__main__":
    main()
