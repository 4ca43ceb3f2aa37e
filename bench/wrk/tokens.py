#!/usr/bin/env python3
"""Prints `user token` lines: an HS256 bearer token (sub = the user id, valid two hours) for
each user from FIRST to LAST, signed with SECRET. Usage: tokens.py SECRET FIRST LAST"""
import base64, hashlib, hmac, json, sys, time


def part(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


secret, first, last = sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3])
header = part(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
expires = int(time.time()) + 7200
out = sys.stdout
for user in range(first, last + 1):
    claims = {"sub": str(user), "roles": [], "exp": expires}
    body = part(json.dumps(claims, separators=(",", ":")).encode())
    signed = f"{header}.{body}".encode()
    signature = part(hmac.new(secret, signed, hashlib.sha256).digest())
    out.write(f"{user} {header}.{body}.{signature}\n")
