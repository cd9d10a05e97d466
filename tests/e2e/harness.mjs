// The pieces the browser suite is built from: the crier binary as a child process, an upstream
// app, a TCP forwarder that can cut every connection through it, a publisher on the Unix
// socket, a certificate, headless Chromium, and the messages with what each transport must
// deliver for them.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, '../..');
/** Artifacts (screenshots, logs) go here; never into the source tree unless asked. */
export const OUT = process.env.CRIER_E2E_OUT || path.join(REPO, 'target', 'e2e');

/** The Chromium flags this machine needs (no sandbox as root, no GPU, no background traffic). */
export const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
  '--no-first-run',
  '--ignore-certificate-errors',
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function crierBin() {
  const bin = process.env.CRIER_BIN || path.join(REPO, 'target', 'debug', 'crier');
  if (!fs.existsSync(bin)) throw new Error(`no crier binary at ${bin}: run \`cargo build\` (or set CRIER_BIN)`);
  return bin;
}

export function tempDir(tag) {
  return fs.mkdtempSync(path.join(os.tmpdir(), `crier-e2e-${tag}-`));
}

/** Polls `check` (sync or async) until it returns a truthy value; throws `what` after `timeout` ms. */
export async function waitFor(what, check, { timeout = 20000, every = 50 } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out after ${timeout} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
    await sleep(every);
  }
}

/** A self-signed certificate for 127.0.0.1 and localhost, made with Debian's openssl. */
export function makeCert(dir) {
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  return { cert, key };
}

/**
 * Starts `crier --config <file>` with every listener on port 0 and waits for `crier is ready`.
 * The real addresses come from its log lines.
 */
export async function startCrier({ upstream, dir, tls, extra = '' }) {
  const sock = path.join(dir, 'publish.sock');
  const config = [
    '[server]',
    'listen = ["127.0.0.1:0"]',
    ...(tls ? ['[server.tls]', 'listen = ["127.0.0.1:0"]', `cert = "${tls.cert}"`, `key = "${tls.key}"`] : []),
    '[upstream]',
    `url = "${upstream}"`,
    '[publish]',
    `unix = "${sock}"`,
    'listen = ["127.0.0.1:0"]',
    '[admin]',
    'listen = "127.0.0.1:0"',
    extra,
  ].join('\n');
  const configPath = path.join(dir, 'crier.toml');
  fs.writeFileSync(configPath, config);
  const proc = spawn(crierBin(), ['--config', configPath, '--log-format', 'json'], {
    env: { ...process.env, CRIER_LOG: 'info' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const log = [];
  const c = { proc, log, unix: sock, configPath, public: null, tls: null, publish: null, admin: null };
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`crier did not report ready within 20 s:\n${log.join('\n')}`)), 20000);
    proc.on('exit', (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`crier exited (${code ?? sig}) before it was ready:\n${log.join('\n')}`));
    });
    readline.createInterface({ input: proc.stderr }).on('line', (line) => {
      log.push(line);
      let msg;
      try {
        msg = JSON.parse(line).fields.message;
      } catch {
        return;
      }
      let m;
      if ((m = /^listening on http:\/\/(\S+) \(public\)$/.exec(msg))) c.public = m[1];
      else if ((m = /^listening on https:\/\/(\S+) \(public, TLS\)$/.exec(msg))) c.tls = m[1];
      else if ((m = /^publish API on http:\/\/(\S+)$/.exec(msg))) c.publish = m[1];
      else if ((m = /^admin on http:\/\/(\S+)/.exec(msg))) c.admin = m[1];
      else if (msg === 'crier is ready') {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  await ready;
  proc.removeAllListeners('exit');
  c.port = Number(c.public.split(':').pop());
  c.tlsPort = c.tls ? Number(c.tls.split(':').pop()) : null;
  /** SIGTERM, then wait for exit (SIGKILL after 10 s); resolves to the exit code. */
  c.stop = () => new Promise((resolve) => {
    if (proc.exitCode !== null) return resolve(proc.exitCode);
    const kill = setTimeout(() => proc.kill('SIGKILL'), 10000);
    proc.once('exit', (code) => { clearTimeout(kill); resolve(code); });
    proc.kill('SIGTERM');
  });
  /** `/channels?prefix=` of the admin listener: the hub's own view of subscribers per transport. */
  c.channel = async (name) => {
    const r = await fetch(`http://${c.admin}/channels?prefix=${encodeURIComponent(name)}`);
    const j = await r.json();
    return j.channels.find((x) => x.channel === name) || null;
  };
  return c;
}

/** The upstream app: serves the test page at `/` (any query), an empty page at `/blank`, 404 elsewhere. */
export async function startUpstream() {
  const page = fs.readFileSync(path.join(HERE, 'page.html'));
  const server = http.createServer((req, res) => {
    const p = req.url.split('?')[0];
    if (p === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(page);
    } else if (p === '/blank') {
      // A page of the app's origin with no subscriptions of its own (the test adds them).
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>blank</title></head><body></body></html>');
    } else if (p === '/favicon.ico') {
      res.writeHead(204).end();
    } else if (p === '/board' || p === '/order') {
      // A legacy app with no push code: a page that only opens an EventSource, and a form
      // whose POST the app answers as it always did ([[publish_on]] in crier does the rest).
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(p === '/board'
        ? '<!doctype html><title>board</title><ul id="orders"></ul><script>' +
          'new EventSource("/live/orders.7").onmessage = (e) => {' +
          ' const li = document.createElement("li"); li.textContent = e.data; orders.append(li); };</script>'
        : '<!doctype html><title>order</title><form method="post" action="/api/orders/7">' +
          '<input name="item" id="item"><button id="send">send</button></form>');
    } else if (p === '/api/orders/7' && req.method === 'POST') {
      req.resume();
      req.on('end', () => {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end('<!doctype html><p id="saved">saved</p>');
      });
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => server.close() };
}

/**
 * A TCP forwarder between Chromium and crier. `cut()` resets every connection through it and
 * refuses new ones (as a dead network would, only faster); `restore()` lets traffic flow again.
 */
export async function startForwarder(targetPort) {
  const pairs = new Set();
  let down = false;
  const server = net.createServer((client) => {
    if (down) {
      client.resetAndDestroy();
      return;
    }
    const up = net.connect(targetPort, '127.0.0.1');
    const pair = [client, up];
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      up.destroy();
    };
    for (const s of pair) {
      s.setNoDelay(true);
      s.on('error', end);
      s.on('close', end);
    }
    client.pipe(up);
    up.pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: server.address().port,
    cut() {
      down = true;
      for (const [client, up] of pairs) {
        client.resetAndDestroy();
        up.resetAndDestroy();
      }
      pairs.clear();
    },
    restore() {
      down = false;
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

/** Publishes over crier's Unix socket; resolves to the JSON answer (`{id, ...}`). */
export function publisher(socketPath) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const publish = (channel, m) => new Promise((resolve, reject) => {
    const headers = { 'content-type': m.contentType, 'content-length': m.body.length };
    if (m.event) headers['crier-event'] = m.event;
    const req = http.request({ socketPath, agent, method: 'POST', path: `/pub/${channel}`, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        if (res.statusCode !== m.expectStatus && !(m.expectStatus === undefined && res.statusCode === 201)) {
          reject(new Error(`publish to ${channel} answered ${res.statusCode}: ${text}`));
        } else {
          resolve({ status: res.statusCode, ...(res.statusCode === 201 ? JSON.parse(text) : {}) });
        }
      });
    });
    req.setTimeout(10000, () => req.destroy(new Error('publish timed out')));
    req.on('error', reject);
    req.end(m.body);
  });
  publish.close = () => agent.destroy();
  return publish;
}

export const MAX_MESSAGE = 64 * 1024;

/**
 * `n` messages that cover what bodies can be: multi-line, non-ASCII, CR and CRLF, named events,
 * JSON, binary (not UTF-8), whitespace, field-like lines, and (with `big`) one within a few
 * bytes of `max_message_size`.
 */
export function makeMessages(n, tag, { big = -1 } = {}) {
  const text = 'text/plain; charset=utf-8';
  const out = [];
  for (let i = 0; i < n; i++) {
    let m;
    if (i === big) {
      let s = `big ${tag} #${i}\n`;
      const unit = 'abcdefghij €uro ✓ 日本 🎉\n';
      while (Buffer.byteLength(s + unit) < MAX_MESSAGE - 64) s += unit;
      s += 'x'.repeat(MAX_MESSAGE - 3 - Buffer.byteLength(s));
      m = { body: Buffer.from(s), contentType: text };
    } else {
      switch (i % 10) {
        case 0: m = { body: Buffer.from(`multi-line ${tag} #${i}\nsecond line\nthird line — the end`), contentType: text }; break;
        case 1: m = { body: Buffer.from(`héllo wörld ✓ 日本語 🎉 Ωμέγα ${tag} #${i}`), contentType: text }; break;
        case 2: m = { body: Buffer.from(`crlf ${tag} #${i}\r\nnext line\rafter a lone CR\r\n`), contentType: text }; break;
        case 3: m = { body: Buffer.from(`a named event ${tag} #${i}`), contentType: text, event: 'note' }; break;
        case 4: m = { body: Buffer.from(JSON.stringify({ n: i, tag, text: 'ünïcödé', list: [1, 2, 3] })), contentType: 'application/json' }; break;
        case 5: {
          const b = Buffer.alloc(256);
          for (let k = 0; k < 256; k++) b[k] = (k * 7 + i) & 0xff;
          m = { body: b, contentType: 'application/octet-stream' };
          break;
        }
        case 6: m = { body: Buffer.from(`  two leading spaces ${tag} #${i}\n\n\nafter empty lines  `), contentType: text }; break;
        case 7: m = { body: Buffer.from(`data: not a field ${tag} #${i}\nid: 1-1\nevent: nope\n: not a comment\nretry: 1`), contentType: text }; break;
        default: m = { body: Buffer.from(`message ${tag} #${i}`), contentType: text };
      }
    }
    out.push(m);
  }
  return out;
}

/** What an EventSource must see for a body: CR and CRLF read as LF, then UTF-8 decoded. */
export function sseData(body) {
  const s = Buffer.from(body.toString('latin1').replace(/\r\n?/g, '\n'), 'latin1');
  return new TextDecoder('utf-8').decode(s);
}

/** Whether crier sends the body as a WebSocket text frame (textual type and valid UTF-8). */
function isText(m) {
  if (!/^(text\/|application\/json)/.test(m.contentType)) return false;
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(m.body);
    return true;
  } catch {
    return false;
  }
}

/**
 * What each transport must have received for `sent` (messages with their publish ids), in
 * the shape the page records: byte-exact for WebSocket, crier.json and long-poll; for SSE the
 * body as an EventSource reads it (see `sseData`).
 */
export function expected(sent) {
  return {
    sse: sent.map((m) => ({ id: m.id, event: m.event || 'message', data: sseData(m.body) })),
    ws: sent.map((m) => (isText(m) ? { data: m.body.toString('utf8') } : { b64: m.body.toString('base64') })),
    wsj: sent.map((m) => {
      let utf8 = true;
      try {
        new TextDecoder('utf-8', { fatal: true }).decode(m.body);
      } catch {
        utf8 = false;
      }
      return utf8 ? { id: m.id, event: m.event, data: m.body.toString('utf8') } : { id: m.id, event: m.event, b64: m.body.toString('base64') };
    }),
    lp: sent.map((m) => ({ id: m.id, event: m.event || null, ct: m.contentType, b64: m.body.toString('base64') })),
  };
}

/** Compares what a client got with what it should have; throws naming the first difference. */
export function assertSame(client, got, want) {
  const norm = (x) => JSON.stringify(x, Object.keys(x).sort());
  const n = Math.min(got.length, want.length);
  for (let i = 0; i < n; i++) {
    const g = { ...got[i] };
    const w = { ...want[i] };
    for (const k of Object.keys(g)) if (g[k] === undefined) delete g[k];
    for (const k of Object.keys(w)) if (w[k] === undefined) delete w[k];
    if (norm(g) !== norm(w)) {
      const show = (x) => JSON.stringify(x).slice(0, 300);
      throw new Error(`${client}: message ${i} differs\n  got  ${show(g)}\n  want ${show(w)}`);
    }
  }
  if (got.length !== want.length) throw new Error(`${client}: got ${got.length} messages, want ${want.length}`);
}
