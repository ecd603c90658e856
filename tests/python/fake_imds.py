#!/usr/bin/env python3
"""A fake EC2 instance metadata service (IMDSv2) for the end-to-end tests
(tests/src/imds.rs), standard library only.

Usage: fake_imds.py [--host 127.0.0.1] [--port 0] [--watch-pid PID]
                    [--log-size N]

Once it listens it prints the port on the first line of stdout (then
stdout is closed); it logs to stderr. With --watch-pid it exits when that
process (the test) is gone.

What it serves, as the real service does where the agent can tell:

- PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds: 1-21600
  returns a token (text/plain) and echoes the TTL in the same header.
  Missing, non-integer or out-of-range TTL -> 400; an X-Forwarded-For
  header -> 403; any other method on the token path -> 405 (Allow: OPTIONS,
  PUT); a PUT on a version-specific token path (/2021-03-23/api/token) ->
  403. Tokens expire after their TTL (or all at once, see the control API).
- GET and HEAD of metadata need a valid X-aws-ec2-metadata-token (HttpTokens
  "required", the default): none -> 401 (counted as "none", IMDSv1 style),
  an unknown or expired one -> 401 (counted as "invalid"). With HttpTokens
  "optional" a request without a token is served (still counted as "none").
  Other methods on metadata paths -> 405.
- /latest/meta-data/{instance-id, instance-type, ami-id, local-ipv4,
  instance-life-cycle, placement/region, placement/availability-zone},
  spot/instance-action ({"action": ..., "time": ...}, 404 until set) and
  spot/termination-time (terminate only), events/recommendations/rebalance
  ({"noticeTime": ...}, 404 until set), autoscaling/target-lifecycle-state
  (404 unless the instance is in an Auto Scaling group), tags/instance/KEY
  (only while tags in metadata are enabled), and
  /latest/dynamic/instance-identity/document (JSON). A path ending in a
  directory lists its entries, one a line, subdirectories with a trailing
  "/". Anything else -> 404. Every answer is text/plain.

Control API, on the same port under /__fake/ (no token, never faulted or
counted). Requests carry JSON bodies; answers are JSON.

  GET  /__fake/state               everything below, as set now
  GET  /__fake/stats               request counts and the request log
  POST /__fake/stats/reset         zero the counts, empty the log
  POST /__fake/reset               back to the state at start (and stats)
  POST /__fake/identity            {"instanceId": ..., "region": ..., ...}
  POST /__fake/spot                {"action": "terminate"|"stop"|"hibernate",
                                    "time": "2026-12-02T10:00:00Z"}
  POST /__fake/spot/clear
  POST /__fake/rebalance           {"noticeTime": "..."}
  POST /__fake/rebalance/clear
  POST /__fake/lifecycle           {"state": "InService"} (null: not in an ASG)
  POST /__fake/tags                {"enabled": true, "tags": {"k": "v"}}
  POST /__fake/options             {"httpTokens": "required"|"optional",
                                    "httpEndpoint": "enabled"|"disabled"}
  POST /__fake/tokens/expire       every token issued so far is expired
  POST /__fake/clock               {"advance": seconds}: tokens age that much
                                   (their TTLs run on the fake's own clock)
  POST /__fake/fault               {"path": P, "mode": M, ...} (see below)
  POST /__fake/faults/clear        {"path": P} clears one, {} clears all

A fault's path is an exact path (query string ignored), a prefix ending in
"*" ("/latest/meta-data/*"), or "*" for every request outside /__fake/,
the token PUT included. The most specific fault applies: exact, then the
longest prefix, then "*". Setting a fault on a path replaces the one there.
Modes:
  {"mode": "status", "status": 500}  answer that status, nothing else done
  {"mode": "hang"}                   read the request, never answer; when
                                     the fault is cleared (or "seconds"
                                     pass, if given) close the connection,
                                     still without an answer
  {"mode": "reset"}                  read the request, close with a reset
                                     (SO_LINGER 0)
  {"mode": "delay", "ms": 200}       wait, then answer as usual
Any fault may carry "count": N to apply to the next N matching requests
only (a hang so started still lasts until cleared or its seconds pass).
"""

import argparse
import json
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600
CONTROL = "/__fake/"
MD = "/latest/meta-data/"
IDENTITY_DOC = "/latest/dynamic/instance-identity/document"
# How often a hung request looks whether it was released or its client left.
HANG_POLL = 0.02

DEFAULT_IDENTITY = {
    "instanceId": "i-0123456789abcdef0",
    "region": "us-east-1",
    "availabilityZone": "us-east-1a",
    "instanceType": "m5.large",
    "accountId": "123456789012",
    "imageId": "ami-0123456789abcdef0",
    "privateIp": "10.0.0.10",
    "architecture": "x86_64",
    "pendingTime": "2026-01-01T00:00:00Z",
    # Not in the identity document: the instance-life-cycle item.
    "instanceLifeCycle": "on-demand",
}
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
FAULT_MODES = ("status", "hang", "reset", "delay")

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
}


def error_page(status):
    """The XHTML error page the real service answers errors with."""
    title = f"{status} - {REASONS.get(status, 'Error')}"
    return (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{title}</title>\n </head>\n"
        f" <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    )


class BadControl(Exception):
    """A control request the fake refuses (400, with the reason)."""


class Fault:
    def __init__(self, spec):
        if not isinstance(spec, dict):
            raise BadControl("a fault is a JSON object")
        self.path = spec.get("path")
        if not isinstance(self.path, str) or not self.path:
            raise BadControl('a fault needs "path": an exact path, a prefix ending in "*", or "*"')
        if self.path.startswith(CONTROL):
            raise BadControl("the control API cannot be faulted")
        self.mode = spec.get("mode")
        if self.mode not in FAULT_MODES:
            raise BadControl(f'"mode" must be one of {FAULT_MODES}')
        self.status = spec.get("status", 500)
        if self.mode == "status" and not (isinstance(self.status, int) and 100 <= self.status <= 599):
            raise BadControl('"status" must be an HTTP status (100-599)')
        self.seconds = spec.get("seconds")
        if self.seconds is not None and not (
            isinstance(self.seconds, (int, float)) and self.seconds >= 0
        ):
            raise BadControl('"seconds" must be a number >= 0')
        self.ms = spec.get("ms", 0)
        if not (isinstance(self.ms, (int, float)) and self.ms >= 0):
            raise BadControl('"ms" must be a number >= 0')
        self.count = spec.get("count")
        if self.count is not None and not (isinstance(self.count, int) and self.count > 0):
            raise BadControl('"count" must be an integer > 0')
        # Set when the fault is cleared (or the fake reset): hung requests
        # it holds let go.
        self.released = threading.Event()

    def describe(self):
        out = {"path": self.path, "mode": self.mode}
        if self.mode == "status":
            out["status"] = self.status
        if self.mode == "delay":
            out["ms"] = self.ms
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.count is not None:
            out["count"] = self.count
        return out

    def matches(self, path):
        if self.path == "*":
            return True
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path == self.path

    def rank(self):
        """Higher wins: exact paths, then longer prefixes, then "*"."""
        if self.path == "*":
            return (0, 0)
        if self.path.endswith("*"):
            return (1, len(self.path))
        return (2, 0)


class State:
    """Everything the control API sets, under one lock."""

    def __init__(self, log_size):
        self.lock = threading.Lock()
        self.log_size = log_size
        self.reset()

    def reset(self):
        with self.lock:
            for fault in getattr(self, "faults", {}).values():
                fault.released.set()
            for fault in getattr(self, "hung_by", []):
                fault.released.set()
            self.identity = dict(DEFAULT_IDENTITY)
            self.spot = None
            self.rebalance = None
            self.lifecycle = None
            self.tags_enabled = False
            self.tags = {}
            self.http_tokens = "required"
            self.http_endpoint = "enabled"
            self.tokens = {}
            self.clock_offset = 0.0
            self.faults = {}
            # Faults whose count ran out while requests they hung still
            # wait: a clear must still release those.
            self.hung_by = []
            self._reset_stats()

    def _reset_stats(self):
        self.total = 0
        self.by_path = {}
        self.by_method = {}
        self.by_status = {}
        self.by_fault = {}
        self.auth = {"v2": 0, "none": 0, "invalid": 0}
        self.tokens_issued = 0
        self.log = deque(maxlen=self.log_size)

    def reset_stats(self):
        with self.lock:
            self._reset_stats()

    # --- requests -------------------------------------------------------

    def take_fault(self, path):
        """The fault that applies to a request on `path`, used up by one."""
        with self.lock:
            found = [f for f in self.faults.values() if f.matches(path)]
            if not found:
                return None
            fault = max(found, key=Fault.rank)
            if fault.count is not None:
                fault.count -= 1
                if fault.count == 0:
                    del self.faults[fault.path]
                    if fault.mode == "hang":
                        self.hung_by.append(fault)
            return fault

    def now(self):
        """The clock tokens expire on (call with the lock held)."""
        return time.monotonic() + self.clock_offset

    def issue_token(self, ttl):
        token = "AQAEA" + secrets.token_urlsafe(42)
        with self.lock:
            self.tokens[token] = self.now() + ttl
            self.tokens_issued += 1
        return token

    def check_token(self, token):
        with self.lock:
            expiry = self.tokens.get(token)
            if expiry is None:
                return False
            if self.now() >= expiry:
                del self.tokens[token]
                return False
            return True

    def record(self, method, path, status, auth, fault, ttl=None):
        entry = {
            "method": method,
            "path": path,
            "status": status,
            "auth": auth,
            "fault": fault,
            "time": time.time(),
        }
        if ttl is not None:
            entry["ttl"] = ttl
        with self.lock:
            self.total += 1
            self.by_path[path] = self.by_path.get(path, 0) + 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            if status is not None:
                key = str(status)
                self.by_status[key] = self.by_status.get(key, 0) + 1
            if fault is not None:
                self.by_fault[fault] = self.by_fault.get(fault, 0) + 1
            if auth in self.auth:
                self.auth[auth] += 1
            self.log.append(entry)

    def leaves(self):
        """Every item served now: path -> text."""
        with self.lock:
            ident = dict(self.identity)
            spot = self.spot
            rebalance = self.rebalance
            lifecycle = self.lifecycle
            tags = dict(self.tags) if self.tags_enabled else None
        items = {
            MD + "ami-id": ident["imageId"],
            MD + "instance-id": ident["instanceId"],
            MD + "instance-type": ident["instanceType"],
            MD + "instance-life-cycle": ident["instanceLifeCycle"],
            MD + "local-ipv4": ident["privateIp"],
            MD + "placement/availability-zone": ident["availabilityZone"],
            MD + "placement/region": ident["region"],
        }
        if spot is not None:
            items[MD + "spot/instance-action"] = json.dumps(
                {"action": spot["action"], "time": spot["time"]}
            )
            if spot["action"] == "terminate":
                items[MD + "spot/termination-time"] = spot["time"]
        if rebalance is not None:
            items[MD + "events/recommendations/rebalance"] = json.dumps(
                {"noticeTime": rebalance}
            )
        if lifecycle is not None:
            items[MD + "autoscaling/target-lifecycle-state"] = lifecycle
        dirs = set()
        if tags is not None:
            dirs.add(MD + "tags/instance/")
            for key, value in tags.items():
                items[MD + "tags/instance/" + key] = value
        doc = {
            "accountId": ident["accountId"],
            "architecture": ident["architecture"],
            "availabilityZone": ident["availabilityZone"],
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": ident["imageId"],
            "instanceId": ident["instanceId"],
            "instanceType": ident["instanceType"],
            "kernelId": None,
            "pendingTime": ident["pendingTime"],
            "privateIp": ident["privateIp"],
            "ramdiskId": None,
            "region": ident["region"],
            "version": "2017-09-30",
        }
        items[IDENTITY_DOC] = json.dumps(doc, indent=2)
        return items, dirs

    # --- control --------------------------------------------------------

    def describe(self):
        with self.lock:
            return {
                "identity": dict(self.identity),
                "spot": self.spot,
                "rebalance": self.rebalance,
                "lifecycle": self.lifecycle,
                "tags": {"enabled": self.tags_enabled, "tags": dict(self.tags)},
                "options": {
                    "httpTokens": self.http_tokens,
                    "httpEndpoint": self.http_endpoint,
                },
                "tokens_live": sum(1 for e in self.tokens.values() if e > self.now()),
                "faults": [f.describe() for f in self.faults.values()],
            }

    def stats(self):
        with self.lock:
            return {
                "total": self.total,
                "by_path": dict(self.by_path),
                "by_method": dict(self.by_method),
                "by_status": dict(self.by_status),
                "by_fault": dict(self.by_fault),
                "auth": dict(self.auth),
                "tokens_issued": self.tokens_issued,
                "log": list(self.log),
            }

    def control(self, method, path, body):
        """Runs one control request; returns the JSON answer."""
        if method == "GET" and path == "/__fake/state":
            return self.describe()
        if method == "GET" and path == "/__fake/stats":
            return self.stats()
        if method != "POST":
            raise BadControl(f"no control {method} {path}")
        if path == "/__fake/reset":
            self.reset()
        elif path == "/__fake/stats/reset":
            self.reset_stats()
        elif path == "/__fake/identity":
            unknown = set(body) - set(DEFAULT_IDENTITY)
            if unknown:
                raise BadControl(f"unknown identity fields {sorted(unknown)}; known: {sorted(DEFAULT_IDENTITY)}")
            for key, value in body.items():
                if not isinstance(value, str):
                    raise BadControl(f"identity field {key} must be a string")
            with self.lock:
                self.identity.update(body)
        elif path == "/__fake/spot":
            action, when = body.get("action"), body.get("time")
            if action not in SPOT_ACTIONS:
                raise BadControl(f'"action" must be one of {SPOT_ACTIONS}')
            if not isinstance(when, str):
                raise BadControl('"time" must be a string such as "2026-12-02T10:00:00Z"')
            with self.lock:
                self.spot = {"action": action, "time": when}
        elif path == "/__fake/spot/clear":
            with self.lock:
                self.spot = None
        elif path == "/__fake/rebalance":
            when = body.get("noticeTime")
            if not isinstance(when, str):
                raise BadControl('"noticeTime" must be a string such as "2026-12-02T10:00:00Z"')
            with self.lock:
                self.rebalance = when
        elif path == "/__fake/rebalance/clear":
            with self.lock:
                self.rebalance = None
        elif path == "/__fake/lifecycle":
            if "state" not in body:
                raise BadControl('"state" is required (null: not in an Auto Scaling group)')
            state = body["state"]
            if state is not None and (not isinstance(state, str) or not state):
                raise BadControl('"state" must be a non-empty string or null')
            with self.lock:
                self.lifecycle = state
        elif path == "/__fake/tags":
            enabled = body.get("enabled", True)
            tags = body.get("tags", {})
            if not isinstance(enabled, bool):
                raise BadControl('"enabled" must be a boolean')
            if not isinstance(tags, dict) or not all(
                isinstance(k, str) and k and "/" not in k and isinstance(v, str)
                for k, v in tags.items()
            ):
                raise BadControl('"tags" must map keys (no "/") to string values')
            with self.lock:
                self.tags_enabled = enabled
                self.tags = dict(tags)
        elif path == "/__fake/options":
            tokens = body.get("httpTokens")
            endpoint = body.get("httpEndpoint")
            if tokens not in (None, "required", "optional"):
                raise BadControl('"httpTokens" must be "required" or "optional"')
            if endpoint not in (None, "enabled", "disabled"):
                raise BadControl('"httpEndpoint" must be "enabled" or "disabled"')
            with self.lock:
                if tokens is not None:
                    self.http_tokens = tokens
                if endpoint is not None:
                    self.http_endpoint = endpoint
        elif path == "/__fake/tokens/expire":
            with self.lock:
                self.tokens.clear()
        elif path == "/__fake/clock":
            advance = body.get("advance")
            if not isinstance(advance, (int, float)) or advance < 0:
                raise BadControl('"advance" must be a number of seconds >= 0')
            with self.lock:
                self.clock_offset += advance
        elif path == "/__fake/fault":
            fault = Fault(body)
            with self.lock:
                old = self.faults.get(fault.path)
                if old is not None:
                    old.released.set()
                self.faults[fault.path] = fault
        elif path == "/__fake/faults/clear":
            which = body.get("path")
            with self.lock:
                cleared = [
                    f
                    for f in list(self.faults.values()) + self.hung_by
                    if which is None or f.path == which
                ]
                for fault in cleared:
                    fault.released.set()
                self.faults = {
                    p: f for p, f in self.faults.items() if which is not None and p != which
                }
                self.hung_by = [
                    f for f in self.hung_by if which is not None and f.path != which
                ]
        else:
            raise BadControl(f"no control {method} {path}")
        return {"ok": True}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "EC2ws"

    # BaseHTTPRequestHandler dispatches on do_<METHOD>: every method goes
    # through one place.
    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.serve
        raise AttributeError(name)

    def log_message(self, format, *args):
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.address_string()} {format % args}\n")

    @property
    def state(self):
        return self.server.state

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
        except ValueError:
            return b""
        return self.rfile.read(n) if n > 0 else b""

    def answer(self, status, body, content_type="text/plain", headers=()):
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def serve(self):
        body = self.read_body()
        path = urlsplit(self.path).path
        if path.startswith(CONTROL):
            self.serve_control(path, body)
        else:
            self.serve_imds(path)

    def serve_control(self, path, raw):
        try:
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise BadControl("the body must be a JSON object")
            out = self.state.control(self.command, path, body)
            status = 200
        except (BadControl, ValueError) as e:
            out, status = {"error": str(e)}, 400
        self.answer(status, json.dumps(out), "application/json")

    # --- the metadata service ---------------------------------------------

    def auth_kind(self, path):
        """What the client sent: "-" for the token request, else "v2"
        (a valid token), "invalid" (a token, not valid) or "none"."""
        if path == TOKEN_PATH or path.endswith("/api/token"):
            return "-"
        token = self.headers.get(TOKEN_HEADER)
        if token is None:
            return "none"
        return "v2" if self.state.check_token(token) else "invalid"

    def serve_imds(self, path):
        method = self.command
        auth = self.auth_kind(path)
        ttl = self.headers.get(TTL_HEADER) if path == TOKEN_PATH else None
        fault = self.state.take_fault(path)
        if fault is not None:
            if fault.mode == "status":
                self.state.record(method, path, fault.status, auth, "status", ttl)
                self.answer(fault.status, f"fault: {fault.status}\n")
                return
            if fault.mode == "reset":
                self.state.record(method, path, None, auth, "reset", ttl)
                self.reset_connection()
                return
            if fault.mode == "hang":
                self.state.record(method, path, None, auth, "hang", ttl)
                self.hang(fault)
                return
            # delay: then answer as usual.
            time.sleep(fault.ms / 1000.0)
        status, body, headers = self.respond(method, path, auth, ttl)
        # Counted before it is answered: a client that has its answer sees
        # it in the stats.
        self.state.record(
            method, path, status, auth, None if fault is None else "delay", ttl
        )
        self.answer(status, body, headers=headers)

    def respond(self, method, path, auth, ttl):
        """The real service's answer: (status, body, extra headers)."""
        st = self.state
        if st.http_endpoint == "disabled":
            return 403, error_page(403), ()
        if path == TOKEN_PATH:
            if method != "PUT":
                return 405, error_page(405), (("Allow", "OPTIONS, PUT"),)
            if self.headers.get("X-Forwarded-For") is not None:
                return 403, error_page(403), ()
            try:
                seconds = int(ttl) if ttl is not None else None
            except ValueError:
                seconds = None
            if seconds is None or not 1 <= seconds <= MAX_TTL:
                return 400, error_page(400), ()
            token = st.issue_token(seconds)
            return 200, token, ((TTL_HEADER, str(seconds)),)
        if path.endswith("/api/token") and method == "PUT":
            # Only /latest/api/token hands out tokens.
            return 403, error_page(403), ()
        if auth == "invalid" or (auth == "none" and st.http_tokens == "required"):
            return 401, error_page(401), ()
        if method not in ("GET", "HEAD"):
            return 405, error_page(405), (("Allow", "GET, HEAD"),)
        items, dirs = st.leaves()
        if path in items:
            return 200, items[path], ()
        listing = self.listing(path, items, dirs)
        if listing is not None:
            return 200, listing, ()
        return 404, error_page(404), ()

    @staticmethod
    def listing(path, items, dirs):
        """The entries of directory `path` (with or without its trailing
        slash), or None if no such directory."""
        prefix = path if path.endswith("/") else path + "/"
        names = []
        for item in items:
            if item.startswith(prefix):
                rest = item[len(prefix):]
                name = rest.split("/", 1)[0] + ("/" if "/" in rest else "")
                if name not in names:
                    names.append(name)
        for d in dirs:
            if d.startswith(prefix) and d != prefix:
                rest = d[len(prefix):]
                name = rest.split("/", 1)[0] + "/"
                if name not in names:
                    names.append(name)
        if not names and prefix not in dirs:
            return None
        return "\n".join(sorted(names))

    def reset_connection(self):
        """Closes the connection with a reset: SO_LINGER 0, then close."""
        self.close_connection = True
        try:
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass
        # The buffered reader holds a reference to the socket: the close
        # (and so the reset) happens when the last one goes.
        self.rfile.close()
        self.connection.close()

    def hang(self, fault):
        """Holds the connection without answering until the fault is
        released or its seconds pass (then closes it, still unanswered), or
        the client leaves."""
        self.close_connection = True
        deadline = None if fault.seconds is None else time.monotonic() + fault.seconds
        while not fault.released.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                readable, _, _ = select.select([self.connection], [], [], HANG_POLL)
                if readable and not self.connection.recv(4096):
                    return  # the client closed its end
            except OSError:
                return


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def watch(pid):
    while True:
        time.sleep(0.2)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


def main():
    parser = argparse.ArgumentParser(description="A fake EC2 IMDSv2 for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--watch-pid", type=int)
    parser.add_argument("--log-size", type=int, default=500)
    args = parser.parse_args()

    server = Server((args.host, args.port), Handler)
    server.state = State(args.log_size)
    if args.watch_pid:
        threading.Thread(target=watch, args=(args.watch_pid,), daemon=True).start()
    sys.stdout.write(f"{server.server_address[1]}\n")
    sys.stdout.flush()
    # Nothing else goes to stdout: nobody reads it after the first line.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
