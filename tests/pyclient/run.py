#!/usr/bin/env python3
"""crier seen by a second, independent protocol implementation: Python clients on PyPI's
`httpx` (HTTP/1.1 and HTTP/2) and `websockets`, with an SSE parser written here from the
WHATWG spec, working on bytes.

    python3 tests/pyclient/run.py        (after `cargo build`; `cargo test --test e2e` runs it too)

The script makes its own venv (CRIER_PY_VENV, default target/pyclient-venv) with the pinned
requirements.txt and re-runs itself inside it. It starts the built crier (CRIER_BIN, default
target/debug/crier) on port 0 with a self-signed certificate (openssl), and checks on every
transport — SSE over HTTP/1.1 and HTTP/2, WebSocket plain and `crier.json` (also over TLS),
long-poll over HTTP/1.1 and HTTP/2:

- delivery: every message, in order, exactly once, byte for byte (SSE modulo CR: a CR or CRLF
  in a body arrives as LF, which is all SSE can carry), with ids, event names, content types;
- a network cut (a TCP forwarder resets every connection and refuses new ones) while
  publishing goes on: every client that can name a position resumes without loss;
- each way to name a position (Last-Event-ID, ?last_event_id=, If-None-Match, `earliest`),
  gap reporting (Crier-Resume: gap) when the position is older than the buffer, and 304.

Ends with "python: N passed, N failed"; exit status 1 on any failure.
"""

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import crier_process

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
REQUIREMENTS = HERE / "requirements.txt"
SUITE_LIMIT_S = 150


def bootstrap():
    """Makes (or reuses) the venv with exactly requirements.txt, then re-runs this script in it."""
    if os.environ.get("CRIER_PY_IN_VENV") == "1":
        return
    venv = Path(os.environ.get("CRIER_PY_VENV") or REPO / "target" / "pyclient-venv")
    py = venv / "bin" / "python"
    stamp = venv / "crier-requirements.txt"
    want = REQUIREMENTS.read_bytes()
    if not (py.exists() and stamp.exists() and stamp.read_bytes() == want):
        if venv.exists():
            shutil.rmtree(venv)
        print(f"setup: {sys.executable} -m venv {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        print(f"setup: pip install -r {REQUIREMENTS.relative_to(REPO)}", flush=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(REQUIREMENTS)],
            check=True,
            timeout=300,
        )
        stamp.write_bytes(want)
    env = {**os.environ, "CRIER_PY_IN_VENV": "1"}
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]], env)


bootstrap()

import httpx  # noqa: E402  (from the venv)
import websockets  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402

MAX_MESSAGE = 64 * 1024
TEXT = "text/plain; charset=utf-8"


# ---------------------------------------------------------------------------------------------
# crier, a certificate, a forwarder


def make_cert(d):
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30,
    )
    return cert, key


class Crier:
    """The built binary with every listener on port 0; addresses read from its log lines."""

    def __init__(self, d, cert, key):
        self.sock = d / "publish.sock"
        self.proc, self.log, addrs = crier_process.start(d, [
            "[server]", 'listen = ["127.0.0.1:0"]',
            "[server.tls]", 'listen = ["127.0.0.1:0"]', f'cert = "{cert}"', f'key = "{key}"',
            "[upstream]", 'url = "http://127.0.0.1:9"', 'connect_timeout = "1s"',
            "[publish]", f'unix = "{self.sock}"', 'listen = ["127.0.0.1:0"]',
            "[admin]", 'listen = "127.0.0.1:0"',
            "[channels]", "buffer_messages = 1000", 'max_message_size = "64KiB"',
            "[[push]]", 'path = "/live/{channel}"', 'keepalive = "5s"', 'longpoll_timeout = "5s"',
            # A small buffer, for gap reporting; a short long-poll wait, for 304.
            "[[push]]", 'path = "/small/{channel}"', 'channel_prefix = "small:"', "buffer_messages = 5",
            'longpoll_timeout = "1s"',
        ])
        self.public, self.tls, self.admin = addrs["public"], addrs["tls"], addrs["admin"]
        self.port = int(self.public.rsplit(":", 1)[1])
        self.tls_port = int(self.tls.rsplit(":", 1)[1])

    async def stop(self):
        """SIGTERM; the exit status (None if it had to be killed after 15 s)."""
        self.proc.terminate()
        for _ in range(300):
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.05)
        self.proc.kill()
        return None


class Forwarder:
    """TCP between the clients and crier; `cut()` resets every connection and refuses new ones."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.down = False
        self.conns = set()

    async def start(self):
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @staticmethod
    def _reset(writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        writer.transport.abort()

    async def _client(self, cr, cw):
        if self.down:
            self._reset(cw)
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self._reset(cw)
            return
        pair = (cw, uw)
        self.conns.add(pair)

        async def pump(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pump(cr, uw), pump(ur, cw))
        self.conns.discard(pair)

    def cut(self):
        self.down = True
        for cw, uw in list(self.conns):
            self._reset(cw)
            self._reset(uw)
        self.conns.clear()

    def restore(self):
        self.down = False

    def close(self):
        self.cut()
        self.server.close()


# ---------------------------------------------------------------------------------------------
# Messages and what each transport must deliver


def messages(n, tag, big=-1):
    out = []
    for i in range(n):
        if i == big:
            s = f"big {tag} #{i}\n"
            unit = "abcdefghij €uro ✓ 日本 🎉\n"
            while len((s + unit).encode()) < MAX_MESSAGE - 64:
                s += unit
            body = s.encode()
            body += b"y" * (MAX_MESSAGE - 2 - len(body))
            out.append({"body": body, "ct": TEXT, "event": None})
            continue
        k = i % 10
        if k == 0:
            m = (f"multi\nline {tag} #{i}\n".encode(), TEXT, None)
        elif k == 1:
            m = (f"ünïcödé ✓ 中文 🚀 {tag} #{i}".encode(), TEXT, None)
        elif k == 2:
            m = (f"cr {tag} #{i}\r\ncrlf above, lone CR here:\rend\r".encode(), TEXT, None)
        elif k == 3:
            m = (f"named event {tag} #{i}".encode(), TEXT, "py-note")
        elif k == 4:
            m = (json.dumps({"i": i, "tag": tag, "s": "ß"}).encode(), "application/json", None)
        elif k == 5:
            m = (bytes((j * 13 + i) % 256 for j in range(300)), "application/octet-stream", None)
        elif k == 6:
            m = (f"\n\nleading newlines, trailing space {tag} #{i} ".encode(), TEXT, None)
        elif k == 7:
            m = (f"id: 0-0\ndata: x\n\n\nevent: fake {tag} #{i}".encode(), TEXT, None)
        elif k == 8:
            m = (f"  {tag} #{i}".encode(), "text/html; charset=utf-8", "py-html")
        else:
            m = (f"plain {tag} #{i}".encode(), TEXT, None)
        out.append({"body": m[0], "ct": m[1], "event": m[2]})
    return out


def utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def is_text(m):
    return (m["ct"].startswith("text/") or m["ct"].startswith("application/json")) and utf8(m["body"])


def sse_body(b):
    return re.sub(rb"\r\n?", b"\n", b)


def want(kind, sent):
    """What a client of `kind` must have recorded for `sent` (each with its publish id)."""
    if kind == "sse":
        return [(m["id"], m["event"], sse_body(m["body"])) for m in sent]
    if kind == "ws":
        return [("text" if is_text(m) else "binary", m["body"]) for m in sent]
    if kind == "wsj":
        return [(m["id"], m["event"], m["body"], utf8(m["body"])) for m in sent]
    if kind == "lp":
        return [(m["id"], m["event"], m["body"], m["ct"]) for m in sent]
    raise ValueError(kind)


def same(name, got, expected):
    for i, (g, w) in enumerate(zip(got, expected)):
        if g != w:
            raise AssertionError(f"{name}: message {i} differs\n  got  {repr(g)[:240]}\n  want {repr(w)[:240]}")
    if len(got) != len(expected):
        raise AssertionError(f"{name}: got {len(got)} messages, want {len(expected)}")


# ---------------------------------------------------------------------------------------------
# An SSE parser on bytes (WHATWG HTML, "Parsing an event stream")

LINE_END = re.compile(rb"\r\n|\r|\n")


class SseParser:
    def __init__(self):
        self.pending = b""
        self.skip_lf = False  # the last chunk ended in CR: a LF first in the next belongs to it
        self.data = b""
        self.event = None
        self.last_id = None
        self.retry = None

    def feed(self, chunk):
        if self.skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self.skip_lf = False
        buf = self.pending + chunk
        lines = LINE_END.split(buf)
        self.pending = lines.pop()
        self.skip_lf = buf.endswith(b"\r")
        events = []
        for line in lines:
            if line == b"":
                if self.data:
                    events.append((self.last_id, self.event, self.data[:-1]))
                self.data, self.event = b"", None
            elif line.startswith(b":"):
                continue
            else:
                field, colon, value = line.partition(b":")
                if colon and value.startswith(b" "):
                    value = value[1:]
                if field == b"data":
                    self.data += value + b"\n"
                elif field == b"event":
                    self.event = value.decode()
                elif field == b"id" and b"\0" not in value:
                    self.last_id = value.decode()
                elif field == b"retry" and value.isdigit():
                    self.retry = int(value)
        return events


# ---------------------------------------------------------------------------------------------
# Clients: each records what it receives and, after a drop, resumes the way its protocol allows


class Client:
    def __init__(self, name, kind):
        self.name, self.kind = name, kind
        self.got = []
        self.open = False
        self.opens = 0
        self.resume = []  # Crier-Resume of each (re)connection or long-poll answer
        self.gaps = []  # in-band gap notices: SSE crier.gap data, crier.json envelopes with "gap"
        self.versions = set()
        self.errors = []
        self.task = None

    def connected(self):
        self.open = True
        self.opens += 1

    def failed(self, e):
        self.open = False
        self.errors.append(f"{type(e).__name__}: {e}")


async def sse_client(c, http, url, resume="header", start=None):
    last = start
    while True:
        headers = {"accept": "text/event-stream"}
        u = url
        if last and resume == "header":
            headers["last-event-id"] = last
        elif last:
            u = f"{url}?last_event_id={last}"
        try:
            async with http.stream("GET", u, headers=headers) as r:
                if r.status_code != 200 or not r.headers["content-type"].startswith("text/event-stream"):
                    raise RuntimeError(f"SSE answered {r.status_code} {r.headers.get('content-type')}")
                c.versions.add(r.http_version)
                c.resume.append(r.headers.get("crier-resume"))
                c.connected()
                p = SseParser()
                async for chunk in r.aiter_raw():
                    for ev in p.feed(chunk):
                        if ev[1] == "crier.gap":
                            c.gaps.append(json.loads(ev[2]))
                        else:
                            c.got.append(ev)
                        last = ev[0]
            c.open = False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 — any failure is a drop; the client reconnects
            c.failed(e)
        await asyncio.sleep(0.2)


async def ws_client(c, url, json_proto, ssl_ctx=None, start=None):
    last = start
    while True:
        u = f"{url}?last_event_id={last}" if json_proto and last else url
        try:
            async with ws_connect(u, subprotocols=["crier.json"] if json_proto else None, ssl=ssl_ctx,
                                  open_timeout=5, max_size=1 << 20, ping_interval=None) as ws:
                if json_proto and ws.subprotocol != "crier.json":
                    raise RuntimeError(f"subprotocol {ws.subprotocol!r}")
                c.resume.append(ws.response.headers.get("crier-resume"))
                c.connected()
                async for msg in ws:
                    if json_proto:
                        f = json.loads(msg)
                        data = f["data"].encode() if "data" in f else base64.b64decode(f["data_b64"])
                        c.got.append((f["id"], f.get("event"), data, "data" in f))
                        if f.get("gap"):
                            c.gaps.append(f)
                        last = f["id"]
                    elif isinstance(msg, str):
                        c.got.append(("text", msg.encode()))
                    else:
                        c.got.append(("binary", bytes(msg)))
            c.open = False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            c.failed(e)
        await asyncio.sleep(0.2)


async def lp_client(c, http, url, start=None):
    etag = f'"{start}"' if start else None
    down = True
    while True:
        try:
            r = await http.get(url, headers={"if-none-match": etag} if etag else {})
            if down:
                c.connected()
                down = False
            c.versions.add(r.http_version)
            if r.status_code == 200:
                etag = r.headers["etag"]
                c.resume.append(r.headers.get("crier-resume"))
                c.got.append((etag.strip('"'), r.headers.get("crier-event"), r.content, r.headers["content-type"]))
            elif r.status_code == 304:
                etag = r.headers.get("etag", etag)
            else:
                raise RuntimeError(f"long-poll answered {r.status_code}: {r.text}")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            c.failed(e)
            down = True
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# The checks


class Suite:
    def __init__(self, crier, tls_ctx, wss_ctx):
        self.crier = crier
        self.tls_ctx = tls_ctx
        self.wss_ctx = wss_ctx
        self.pub = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(crier.sock)), base_url="http://crier")
        self.admin = httpx.AsyncClient(base_url=f"http://{crier.admin}")
        timeout = httpx.Timeout(5.0, read=30.0)
        self.h1 = httpx.AsyncClient(timeout=timeout)
        self.h2 = httpx.AsyncClient(http2=True, verify=tls_ctx, timeout=timeout)
        self.passed = self.failed = 0

    async def close(self):
        for c in (self.pub, self.admin, self.h1, self.h2):
            await c.aclose()

    async def check(self, name, coro):
        t = time.monotonic()
        try:
            await coro
            self.passed += 1
            print(f"ok     {name} ({time.monotonic() - t:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001 — report and go on with the next check
            self.failed += 1
            tb = traceback.format_exc().rstrip().replace("\n", "\n    ")
            print(f"FAILED {name} ({time.monotonic() - t:.1f} s)\n    {tb}", flush=True)

    async def publish(self, channel, msgs, pause=0.0):
        sent = []
        for m in msgs:
            headers = {"content-type": m["ct"]}
            if m["event"]:
                headers["crier-event"] = m["event"]
            r = await self.pub.post(f"/pub/{channel}", content=m["body"], headers=headers)
            assert r.status_code == 201, f"publish answered {r.status_code}: {r.text}"
            sent.append({**m, "id": r.json()["id"]})
            if pause:
                await asyncio.sleep(pause)
        return sent

    async def counts(self, channel):
        r = await self.admin.get("/channels", params={"prefix": channel})
        for c in r.json()["channels"]:
            if c["channel"] == channel:
                return c["subscribers_by_transport"]
        return None

    async def until(self, what, cond, timeout=20.0):
        end = time.monotonic() + timeout
        while True:
            v = cond()
            if asyncio.iscoroutine(v):
                v = await v
            if v:
                return v
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.05)

    def clients(self, channel, fwd, tls_fwd, starts=None):
        """Every transport, through the forwarders: (client, coroutine) pairs."""
        plain = f"127.0.0.1:{fwd.port}"
        tls = f"127.0.0.1:{tls_fwd.port}"
        path = f"/live/{channel}"
        cs = [
            (Client("SSE HTTP/1.1, Last-Event-ID", "sse"), lambda c: sse_client(c, self.h1, f"http://{plain}{path}")),
            (Client("SSE HTTP/1.1, ?last_event_id", "sse"), lambda c: sse_client(c, self.h1, f"http://{plain}{path}", resume="query")),
            (Client("SSE HTTP/2 (TLS)", "sse"), lambda c: sse_client(c, self.h2, f"https://{tls}{path}")),
            (Client("WebSocket", "ws"), lambda c: ws_client(c, f"ws://{plain}{path}", False)),
            (Client("WebSocket crier.json", "wsj"), lambda c: ws_client(c, f"ws://{plain}{path}", True)),
            (Client("WebSocket crier.json (TLS)", "wsj"), lambda c: ws_client(c, f"wss://{tls}{path}", True, self.wss_ctx)),
            (Client("long-poll HTTP/1.1", "lp"), lambda c: lp_client(c, self.h1, f"http://{plain}{path}")),
            (Client("long-poll HTTP/2 (TLS)", "lp"), lambda c: lp_client(c, self.h2, f"https://{tls}{path}")),
        ]
        out = []
        for c, make in cs:
            c.task = asyncio.create_task(make(c))
            out.append(c)
        return out

    async def subscribed(self, channel):
        want_ = {"websocket": 3, "sse": 3, "longpoll": 2, "webrtc": 0}
        seen = []

        async def counted():
            seen.append(await self.counts(channel))
            return seen[-1] == want_

        try:
            await self.until(f"crier to count every client on {channel}", counted)
        except AssertionError as e:
            raise AssertionError(f"{e}: crier counts {seen[-1]}, want {want_}") from None

    @staticmethod
    async def stop(clients):
        for c in clients:
            c.task.cancel()
        await asyncio.gather(*(c.task for c in clients), return_exceptions=True)

    async def delivery(self, fwd, tls_fwd):
        channel = "py-delivery"
        cs = self.clients(channel, fwd, tls_fwd)
        try:
            await self.subscribed(channel)
            sent = await self.publish(channel, messages(120, "delivery", big=60))
            await self.until("120 messages at every client", lambda: all(len(c.got) >= 120 for c in cs), 30)
            await asyncio.sleep(0.3)  # a duplicate would arrive now
            for c in cs:
                same(c.name, c.got, want(c.kind, sent))
                assert all(r == "ok" for r in c.resume), f"{c.name}: Crier-Resume {c.resume}"
            versions = {c.name: c.versions for c in cs if c.versions}
            assert versions["SSE HTTP/2 (TLS)"] == {"HTTP/2"}, versions
            assert versions["long-poll HTTP/2 (TLS)"] == {"HTTP/2"}, versions
            assert versions["SSE HTTP/1.1, Last-Event-ID"] == {"HTTP/1.1"}, versions
        finally:
            await self.stop(cs)

    async def network_cut(self, fwd, tls_fwd):
        channel = "py-cut"
        cs = self.clients(channel, fwd, tls_fwd)
        try:
            await self.subscribed(channel)
            all_ = messages(90, "cut")
            before = await self.publish(channel, all_[:30])
            await self.until("the first 30 everywhere", lambda: all(len(c.got) >= 30 for c in cs))
            opens = {c.name: c.opens for c in cs}
            fwd.cut()
            tls_fwd.cut()
            await self.until("every streaming client to see the cut",
                             lambda: not any(c.open for c in cs if c.kind != "lp"), 10)
            during = await self.publish(channel, all_[30:60], pause=0.01)
            await asyncio.sleep(0.5)
            fwd.restore()
            tls_fwd.restore()
            await self.until("every client to reconnect",
                             lambda: all(c.open and c.opens > opens[c.name] for c in cs if c.kind != "lp"), 15)
            await self.subscribed(channel)
            after = await self.publish(channel, all_[60:])
            await self.until("every message after the cut",
                             lambda: all(len(c.got) >= (60 if c.kind == "ws" else 90) for c in cs), 30)
            await asyncio.sleep(0.3)
            for c in cs:
                expected = before + after if c.kind == "ws" else before + during + after
                same(f"{c.name} (after a cut)", c.got, want(c.kind, expected))
                assert all(r == "ok" for r in c.resume), f"{c.name}: Crier-Resume {c.resume}"
                assert c.kind == "lp" or c.opens >= 2, f"{c.name} never reconnected"
        except Exception:
            for c in cs:
                print(f"    {c.name}: open {c.open}, opens {c.opens}, got {len(c.got)}, errors {c.errors[-3:]}")
            raise
        finally:
            await self.stop(cs)

    async def positions(self):
        """Each way to name a position gets exactly what came after it."""
        channel = "py-positions"
        sent = await self.publish(channel, messages(10, "pos"))
        base = f"http://{self.crier.public}/live/{channel}"
        after3 = sent[4:]

        async def first_n(make, n, kind):
            c = Client(kind, kind)
            c.task = asyncio.create_task(make(c))
            try:
                await self.until(f"{n} messages ({kind})", lambda: len(c.got) >= n, 10)
                await asyncio.sleep(0.2)
                return c
            finally:
                await self.stop([c])

        c = await first_n(lambda c: sse_client(c, self.h1, base, "header", start=sent[3]["id"]), 6, "sse")
        same("SSE from Last-Event-ID", c.got, want("sse", after3))
        assert c.resume == ["ok"], c.resume
        c = await first_n(lambda c: sse_client(c, self.h1, base, "query", start=sent[3]["id"]), 6, "sse")
        same("SSE from ?last_event_id", c.got, want("sse", after3))
        c = await first_n(lambda c: sse_client(c, self.h1, base, "query", start="earliest"), 10, "sse")
        same("SSE from earliest", c.got, want("sse", sent))
        c = await first_n(lambda c: ws_client(c, f"ws://{self.crier.public}/live/{channel}", True, start=sent[3]["id"]), 6, "wsj")
        same("crier.json from ?last_event_id", c.got, want("wsj", after3))
        c = await first_n(lambda c: lp_client(c, self.h1, base, start=sent[3]["id"]), 6, "lp")
        same("long-poll from If-None-Match", c.got, want("lp", after3))
        r = await self.h1.get(f"{base}?last_event_id={sent[3]['id']}")
        assert r.status_code == 200 and r.headers["etag"] == f'"{sent[4]["id"]}"', (r.status_code, r.headers)
        assert r.content == sent[4]["body"]

    async def gaps(self):
        """A position older than the buffer: the whole buffer, and Crier-Resume: gap."""
        channel = "gap"
        sent = await self.publish(f"small:{channel}", messages(12, "gap"))
        buffered = sent[-5:]
        base = f"http://{self.crier.public}/small/{channel}"
        first = sent[0]["id"]

        c = Client("sse", "sse")
        c.task = asyncio.create_task(sse_client(c, self.h1, base, "header", start=first))
        c2 = Client("wsj", "wsj")
        c2.task = asyncio.create_task(ws_client(c2, f"ws://{self.crier.public}/small/{channel}", True, start=first))
        try:
            await self.until("the 5 buffered messages", lambda: len(c.got) >= 5 and len(c2.got) >= 5, 10)
            await asyncio.sleep(0.2)
        finally:
            await self.stop([c, c2])
        same("SSE after a gap", c.got, want("sse", buffered))
        assert c.resume[0] == "gap", c.resume
        # Told in band too: an EventSource cannot read the header.
        assert c.gaps == [{"channel": channel, "next": buffered[0]["id"]}], c.gaps
        same("crier.json after a gap", c2.got, want("wsj", buffered))
        assert c2.resume[0] == "gap", c2.resume
        assert [g["id"] for g in c2.gaps] == [buffered[0]["id"]], c2.gaps
        r = await self.h1.get(base, headers={"if-none-match": f'"{first}"'})
        assert r.status_code == 200 and r.headers["crier-resume"] == "gap", (r.status_code, dict(r.headers))
        assert r.headers["etag"] == f'"{buffered[0]["id"]}"' and r.content == buffered[0]["body"]
        # Up to date: nothing within longpoll_timeout (1 s here) is 304 with the same ETag.
        t = time.monotonic()
        r = await self.h1.get(base, headers={"if-none-match": f'"{sent[-1]["id"]}"'})
        assert r.status_code == 304 and r.headers["etag"] == f'"{sent[-1]["id"]}"', (r.status_code, dict(r.headers))
        assert 0.8 < time.monotonic() - t < 3, f"304 after {time.monotonic() - t:.2f} s"

    async def publish_limits(self):
        r = await self.pub.post("/pub/py-limits", content=b"x" * MAX_MESSAGE)
        assert r.status_code == 201, r.status_code
        r = await self.pub.post("/pub/bad%20name", content=b"x")
        assert r.status_code == 400, (r.status_code, r.text)
        # On a connection of its own: crier closes it after refusing a body it did not read.
        transport = httpx.AsyncHTTPTransport(uds=str(self.crier.sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://crier") as one:
            r = await one.post("/pub/py-limits", content=b"x" * (MAX_MESSAGE + 1))
        assert r.status_code == 413 and "error" in r.json(), (r.status_code, r.text)


async def main():
    started = time.monotonic()
    d = Path(tempfile.mkdtemp(prefix="crier-py-"))
    crier = None
    try:
        cert, key = make_cert(d)
        crier = Crier(d, cert, key)
        tls_ctx = ssl.create_default_context(cafile=str(cert))
        # Its own context: httpx sets ALPN (h2) on the context it is given, and a WebSocket
        # client that offered h2 would get an HTTP/2 connection it cannot use.
        wss_ctx = ssl.create_default_context(cafile=str(cert))
        fwd = await Forwarder(crier.port).start()
        tls_fwd = await Forwarder(crier.tls_port).start()
        print(f"crier: public {crier.public}, TLS {crier.tls}, admin {crier.admin}; httpx {httpx.__version__}, "
              f"websockets {websockets.__version__}", flush=True)
        s = Suite(crier, tls_ctx, wss_ctx)
        await s.check("delivery: 120 messages on 8 clients (SSE h1/h2, WebSocket plain/json/TLS, long-poll h1/h2), "
                      "byte for byte", s.delivery(fwd, tls_fwd))
        await s.check("network cut: every client that names a position resumes without loss or duplicates",
                      s.network_cut(fwd, tls_fwd))
        await s.check("positions: Last-Event-ID, ?last_event_id, earliest, If-None-Match", s.positions())
        await s.check("gaps: Crier-Resume: gap on SSE, WebSocket and long-poll; 304 when up to date", s.gaps())
        await s.check("publish limits: max_message_size is inclusive, one byte more is 413; bad channel 400",
                      s.publish_limits())
        await s.close()
        fwd.close()
        tls_fwd.close()
        code = await crier.stop()
        if code != 0:
            s.failed += 1
            print(f"FAILED crier exited {code} on SIGTERM", flush=True)
        if s.failed:
            out = Path(os.environ.get("CRIER_E2E_OUT") or REPO / "target" / "e2e")
            out.mkdir(parents=True, exist_ok=True)
            (out / "crier-python.log").write_text("\n".join(crier.log))
            print(f"crier's log: {out / 'crier-python.log'}")
        print(f"{time.monotonic() - started:.1f} s in all")
        print(f"python: {s.passed} passed, {s.failed} failed", flush=True)
        return 1 if s.failed else 0
    finally:
        if crier and crier.proc.poll() is None:
            crier.proc.kill()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(asyncio.wait_for(main(), SUITE_LIMIT_S)))
    except TimeoutError:
        print(f"FAILED the suite did not finish within {SUITE_LIMIT_S} s")
        print("python: 0 passed, 1 failed")
        sys.exit(1)
