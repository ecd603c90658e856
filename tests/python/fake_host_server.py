#!/usr/bin/env python3
"""A fake instance metadata service and a fake "anywhere else", for the
egress tests (tests/src/netns.rs). Runs as root inside the test's own
network namespace, never the machine's.

Usage: fake_host_server.py RUN_DIR WATCH_PID ADDRESS...

On port 80 of every ADDRESS it serves TCP (reads one line, answers
"ok LINE") and UDP (answers each datagram "ok DATAGRAM"), and appends
"tcp|udp ADDRESS TOKEN" to RUN_DIR/server.log for every request it got
before answering, so a test can tell what reached it. RUN_DIR/ready
holds its pid once every socket is bound. It exits when WATCH_PID (the
test process) is gone.
"""

import os
import socket
import sys
import threading
import time

PORT = 80


def main():
    run_dir, watch_pid, addresses = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    log_path = os.path.join(run_dir, "server.log")
    lock = threading.Lock()

    def log(proto, address, token):
        with lock:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(f"{proto} {address} {token}\n")

    def serve_tcp(conn, address):
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while not data.endswith(b"\n") and len(data) < 512:
                    chunk = conn.recv(512)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                return
            token = data.decode("utf-8", "replace").strip()
            log("tcp", address, token)
            try:
                conn.sendall(f"ok {token}\n".encode())
            except OSError:
                pass

    def tcp_loop(sock, address):
        while True:
            conn, _ = sock.accept()
            threading.Thread(
                target=serve_tcp, args=(conn, address), daemon=True
            ).start()

    def udp_loop(sock, address):
        while True:
            data, peer = sock.recvfrom(512)
            token = data.decode("utf-8", "replace").strip()
            log("udp", address, token)
            try:
                sock.sendto(f"ok {token}\n".encode(), peer)
            except OSError:
                pass

    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for kind, loop in ((socket.SOCK_STREAM, tcp_loop), (socket.SOCK_DGRAM, udp_loop)):
            sock = socket.socket(family, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, PORT))
            if kind == socket.SOCK_STREAM:
                sock.listen(64)
            threading.Thread(target=loop, args=(sock, address), daemon=True).start()

    ready = os.path.join(run_dir, "ready")
    with open(ready + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(ready + ".tmp", ready)

    while True:
        time.sleep(0.2)
        try:
            os.kill(watch_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


if __name__ == "__main__":
    main()
