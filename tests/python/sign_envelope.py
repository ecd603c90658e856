#!/usr/bin/env python3
"""An independent producer of batchly job envelopes, written from
docs/envelope.md alone (not from the agent's code), so the end-to-end tests
can show that the spec is what producer and agent both follow.

Usage: sign_envelope.py KEY_FILE KID IAT EXP JOB_JSON_TEXT

KEY_FILE is a signing key file (`batchly-agent keygen` writes one): TOML with
one [[key]] table holding `alg` and either `private_key` (base64 of the
32-byte Ed25519 seed) or `secret` (base64, HMAC-SHA256). The envelope is
signed with that key but labelled KID, so a test can also build envelopes
naming a key the agent does not know. Prints the message body on stdout.

Needs Python 3.11+ (tomllib) and the `cryptography` package.
"""

import base64
import hashlib
import hmac
import json
import sys
import tomllib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DOMAIN = "batchly-job-v1"


def signing_input(kid: str, iat: int, exp: int, job: str) -> bytes:
    # "batchly-job-v1" LF kid LF decimal(iat) LF decimal(exp) LF job
    return f"{DOMAIN}\n{kid}\n{iat}\n{exp}\n{job}".encode("utf-8")


def signature(key: dict, message: bytes) -> bytes:
    alg = key["alg"]
    if alg == "ed25519":
        seed = base64.b64decode(key["private_key"], validate=True)
        return Ed25519PrivateKey.from_private_bytes(seed).sign(message)
    if alg == "hmac-sha256":
        secret = base64.b64decode(key["secret"], validate=True)
        return hmac.new(secret, message, hashlib.sha256).digest()
    raise SystemExit(f"unsupported alg {alg!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    key_file, kid, iat, exp, job = argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5]
    with open(key_file, "rb") as f:
        keys = tomllib.load(f)["key"]
    if len(keys) != 1:
        raise SystemExit(f"{key_file}: expected one [[key]], found {len(keys)}")
    sig = signature(keys[0], signing_input(kid, iat, exp, job))
    body = {
        "v": 1,
        "kid": kid,
        "iat": iat,
        "exp": exp,
        "job": job,
        "sig": base64.b64encode(sig).decode("ascii"),
    }
    print(json.dumps(body))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
