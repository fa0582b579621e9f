"""The MMDS HTTP service: request parsing, V1 and V2 (tokens), JSON and IMDS formats, errors
with Firecracker's statuses and messages."""

from __future__ import annotations

import pytest

from corral.devices.mmds.service import (
    MAX_REQUEST,
    BadRequest,
    Mmds,
    parse_request,
    request_path,
)

DATA = {
    "latest": {"meta-data": {"ami-id": "ami-87654321", "reservation-id": "r-79054aef", "n": 3}},
    "age": 43,
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def ask(mmds: Mmds, raw: bytes):
    parsed = parse_request(raw)
    assert parsed is not None
    req, used = parsed
    assert used == len(raw)
    return mmds.respond(req)


def get(path: str, *headers: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    ).encode()


def put_token(ttl: str | None = "60", *extra: str) -> bytes:
    hdrs = ([f"X-metadata-token-ttl-seconds: {ttl}"] if ttl is not None else []) + list(extra)
    return ("PUT /latest/api/token HTTP/1.1\r\n" + "".join(h + "\r\n" for h in hdrs) + "\r\n").encode()


def test_parse_waits_for_the_whole_request_and_its_body():
    raw = b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n"
    assert parse_request(raw[:10]) is None
    assert parse_request(raw[:40]) is None  # head complete, body not
    req, used = parse_request(raw)
    assert (req.method, req.target, req.body, used) == ("PUT", "/x", b"abc", 41)
    assert parse_request(raw[used:])[0].method == "GET"


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 100 + b"\r\n",
        b"GET /" + b"a" * MAX_REQUEST,  # never ends within the limit
    ],
)
def test_malformed_requests_are_bad_requests(raw):
    with pytest.raises(BadRequest):
        parse_request(raw)


def test_request_path_folds_slashes_and_takes_absolute_targets():
    assert request_path("http://169.254.169.254//latest///meta-data?x=1") == "/latest/meta-data"
    assert request_path("http://169.254.169.254") == ""
    assert request_path("/") == "/"


def test_v1_get_imds_and_json():
    mmds = Mmds(lambda: DATA)
    r = ask(mmds, get("/latest/meta-data/"))
    assert (r.status, r.body, r.content_type) == (200, b"ami-id\nn\nreservation-id", "text/plain")
    assert ask(mmds, get("/")).body == b"age\nlatest/"
    assert ask(mmds, get("/latest/meta-data/ami-id")).body == b"ami-87654321"
    r = ask(mmds, get("/latest/meta-data", "Accept: application/json"))
    assert (r.status, r.content_type) == (200, "application/json")
    assert r.body == b'{"ami-id":"ami-87654321","n":3,"reservation-id":"r-79054aef"}'
    assert ask(mmds, get("/age", "Accept: application/json")).body == b"43"


def test_v1_errors():
    mmds = Mmds(lambda: DATA)
    r = ask(mmds, get("/latest/nothing"))
    assert (r.status, r.body) == (404, b"Resource not found: /latest/nothing.")
    r = ask(mmds, get("/age"))  # IMDS text has no numbers
    assert (r.status, r.body) == (501, b"Cannot retrieve value. The value has an unsupported type.")
    r = ask(mmds, b"POST /latest HTTP/1.1\r\n\r\n")
    assert (r.status, r.allow) == (405, "GET, PUT")
    assert b"Allow: GET, PUT\r\n" in r.encode()
    assert ask(Mmds(lambda: None), get("/")).status == 404  # no data stored yet
    assert ask(mmds, b"GET http://x HTTP/1.1\r\n\r\n").status == 400


def test_v1_ignores_tokens_but_issues_them():
    mmds = Mmds(lambda: DATA)
    assert ask(mmds, get("/age", "Accept: application/json", "X-metadata-token: junk")).status == 200
    assert ask(mmds, put_token("10")).status == 200


def test_v2_token_flow():
    clock = Clock()
    mmds = Mmds(lambda: DATA, version="V2", clock=clock)
    r = ask(mmds, get("/latest/meta-data/ami-id"))
    assert r.status == 401 and b"No MMDS token provided" in r.body
    r = ask(mmds, put_token("60"))
    assert r.status == 200 and r.content_type == "text/plain"
    token = r.body.decode()
    ok = ask(mmds, get("/latest/meta-data/ami-id", f"X-metadata-token: {token}"))
    assert (ok.status, ok.body) == (200, b"ami-87654321")
    aws = ask(mmds, get("/latest/meta-data/ami-id", f"X-aws-ec2-metadata-token: {token}"))
    assert aws.status == 200
    bad = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    r = ask(mmds, get("/latest", f"X-metadata-token: {bad}"))
    assert (r.status, r.body) == (401, b"MMDS token not valid.")
    clock.now += 61
    assert ask(mmds, get("/latest", f"X-metadata-token: {token}")).status == 401  # expired
    # another service (a restored snapshot) does not take this one's tokens
    other = Mmds(lambda: DATA, version="V2", clock=clock)
    fresh = ask(mmds, put_token("60")).body.decode()
    assert ask(other, get("/latest", f"X-metadata-token: {fresh}")).status == 401


@pytest.mark.parametrize(
    ("ttl", "status", "words"),
    [
        ("0", 400, b"between 1 and 21600"),
        ("21601", 400, b"between 1 and 21600"),
        ("21600", 200, b""),
        ("1", 200, b""),
        ("abc", 400, b"Invalid value"),
        ("-5", 400, b"Invalid value"),
        (None, 400, b"Token time to live value not found"),
    ],
)
def test_v2_token_ttl_bounds(ttl, status, words):
    r = ask(Mmds(lambda: DATA, version="V2"), put_token(ttl))
    assert r.status == status and words in r.body


def test_v2_refuses_forwarded_puts_other_paths_and_methods():
    mmds = Mmds(lambda: DATA, version="V2")
    assert ask(mmds, put_token("60", "X-Forwarded-For: 10.0.0.1")).status == 400
    r = ask(mmds, b"PUT /latest/other HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n")
    assert r.status == 404
    assert ask(mmds, b"DELETE / HTTP/1.1\r\n\r\n").status == 405


def test_imds_compat_answers_text_whatever_the_accept():
    mmds = Mmds(lambda: DATA, imds_compat=True)
    r = ask(mmds, get("/latest/meta-data/ami-id", "Accept: application/json"))
    assert (r.body, r.content_type) == (b"ami-87654321", "text/plain")


def test_updates_are_seen_by_the_next_request():
    store = {"data": {"a": "1"}}
    mmds = Mmds(lambda: store["data"])
    assert ask(mmds, get("/a")).body == b"1"
    store["data"] = {"a": "2"}
    assert ask(mmds, get("/a")).body == b"2"


def test_keep_alive_rules():
    assert parse_request(b"GET / HTTP/1.1\r\n\r\n")[0].keep_alive
    assert not parse_request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")[0].keep_alive
    assert not parse_request(b"GET / HTTP/1.0\r\n\r\n")[0].keep_alive
