// crier's WebRTC transport with a real browser: headless Debian Chromium (its own WebRTC stack,
// libwebrtc + usrsctp), driven by playwright-core.
//
//   node tests/e2e/webrtc.mjs     (after `cargo build`; `cargo test --test e2e` runs it too)
//
// Env as for run.mjs: CRIER_BIN, CHROMIUM, CRIER_E2E_OUT.
//
// What it proves: a page served through crier opens an RTCPeerConnection with no ICE servers,
// POSTs its offer to /live/{channel}, sets the answer, and receives 100 published messages
// (multi-line, unicode, CR/CRLF, named events, JSON, binary, a 10 KiB one and one near the
// 64 KiB limit) in order, each one crier.json envelope, byte-exact; after the peer connection
// is closed, a new one with ?last_event_id= gets exactly the rest; DELETE on the Location ends
// the session (204, the channel closes) and crier's gauges go back to zero; an offer that also
// has an audio section gets it rejected and its data channel all the same; one data channel
// on /live/a,b,c says where each channel starts, carries all three (named, in publish order), and
// after a teardown the compound cursor resumes every channel exactly; `crier demo`'s page
// shows a published message in all four columns (EventSource, WebSocket, long-poll, WebRTC).

import { execSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

import {
  CHROMIUM_FLAGS, HERE, MAX_MESSAGE, OUT, assertSame, crierBin, expected, makeMessages, publisher,
  sleep, startCrier, tempDir, waitFor,
} from './harness.mjs';

const SUITE_LIMIT_MS = 120_000;
const watchdog = setTimeout(() => {
  console.log(`FAILED the WebRTC suite did not finish within ${SUITE_LIMIT_MS / 1000} s`);
  process.exit(1);
}, SUITE_LIMIT_MS);
watchdog.unref();

const results = [];
const pageErrors = [];
async function step(name, fn) {
  const start = Date.now();
  pageErrors.length = 0;
  try {
    await fn();
    if (pageErrors.length) throw new Error(`script errors on the page:\n${pageErrors.join('\n')}`);
    results.push({ name, ok: true });
    console.log(`ok     ${name} (${((Date.now() - start) / 1000).toFixed(1)} s)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`FAILED ${name} (${((Date.now() - start) / 1000).toFixed(1)} s)\n${String(e.stack || e).replace(/^/gm, '    ')}`);
  }
}

/** The upstream app: serves the WebRTC test page at `/`. */
async function startUpstream() {
  const page = fs.readFileSync(path.join(HERE, 'webrtc.html'));
  const server = http.createServer((req, res) => {
    if (req.url.split('?')[0] === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(page);
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => server.close() };
}

/** One sample of crier's /metrics, e.g. `crier_webrtc_sessions{state="open"}`. */
async function metric(crier, sample) {
  const text = await (await fetch(`http://${crier.admin}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(sample + ' '));
  return line === undefined ? null : Number(line.slice(sample.length + 1));
}

/** The messages: run.mjs's mix, with #50 a 10 KiB multi-line unicode body and #77 near the limit. */
function messages() {
  const ms = makeMessages(100, 'rtc', { big: 77 });
  let s = '';
  while (Buffer.byteLength(s) < 10 * 1024) s += `line ${s.length} — ünïcödé ✓ 日本 🎉\n`;
  ms[50] = { body: Buffer.from(s), contentType: 'text/plain; charset=utf-8' };
  return ms;
}

fs.mkdirSync(OUT, { recursive: true });
const dir = tempDir('webrtc');
const upstream = await startUpstream();
const crier = await startCrier({
  upstream: upstream.url,
  dir,
  extra: [
    '[channels]',
    'buffer_messages = 1000',
    `max_message_size = "${MAX_MESSAGE / 1024}KiB"`,
    '[webrtc]',
    'listen = "127.0.0.1:0"',
    'ice_timeout = "10s"',
  ].join('\n'),
});
const publish = publisher(crier.unix);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    ...CHROMIUM_FLAGS,
    // Loopback candidates only exist with these: no mDNS names, 127.0.0.1 allowed.
    '--allow-loopback-in-peer-connection',
    '--disable-features=WebRtcHideLocalIpsWithMdns',
  ],
});
const page = await browser.newPage();
page.on('pageerror', (e) => pageErrors.push(String(e)));
const sent = [];

try {
  await page.goto(`http://${crier.public}/`);

  await step('100 messages over a data channel, in order, byte-exact', async () => {
    await page.evaluate(() => subscribe('/live/rtc'));
    await waitFor('the data channel to open', () => page.evaluate(() => T.opened === 1 || T.errors.length));
    const errs = await page.evaluate(() => T.errors);
    if (errs.length) throw new Error(errs.join('\n'));
    const loc = await page.evaluate(() => T.location);
    if (!/^\/live\/rtc\?webrtc_session=[0-9a-f]{32}$/.test(loc)) throw new Error(`Location ${loc}`);
    for (const m of messages()) sent.push({ ...m, id: (await publish('rtc', m)).id });
    await waitFor('100 messages', () => page.evaluate(() => T.received.length >= 100), { timeout: 30000 });
    assertSame('webrtc', await page.evaluate(() => T.received), expected(sent).wsj);
    if ((await metric(crier, 'crier_webrtc_sessions{state="open"}')) !== 1) throw new Error('the open-sessions gauge is not 1');
  });

  await step('resume after the peer connection is torn down: exactly the rest', async () => {
    await page.evaluate(() => { window.pc.close(); T.received = []; });
    // The browser says goodbye (DTLS close_notify / SCTP abort): the session ends.
    await waitFor('the session to end', async () => (await metric(crier, 'crier_connections{transport="webrtc"}')) === 0);
    const last = sent[sent.length - 1].id;
    const more = makeMessages(5, 'after');
    const rest = [];
    for (const m of more) rest.push({ ...m, id: (await publish('rtc', m)).id });
    await page.evaluate((id) => subscribe(`/live/rtc?last_event_id=${id}`), last);
    await waitFor('the rest', () => page.evaluate(() => T.received.length >= 5), { timeout: 20000 });
    await new Promise((r) => setTimeout(r, 500)); // nothing more may come
    assertSame('webrtc resume', await page.evaluate(() => T.received), expected(rest).wsj);
  });

  await step('DELETE on the Location ends the session', async () => {
    const status = await page.evaluate(() => unsubscribe());
    if (status !== 204) throw new Error(`DELETE answered ${status}`);
    await waitFor('the data channel to close', () => page.evaluate(() => T.closed >= 2));
    await waitFor('the gauges to reach zero', async () =>
      (await metric(crier, 'crier_webrtc_sessions{state="open"}')) === 0
      && (await metric(crier, 'crier_connections{transport="webrtc"}')) === 0);
    const again = await page.evaluate(() => unsubscribe());
    if (again !== 404) throw new Error(`a second DELETE answered ${again}`);
  });

  await step('an offer with an audio section too: it is rejected, the data channel opens', async () => {
    await page.evaluate(() => { T.received = []; T.opened = 0; T.errors = []; return subscribe('/live/rtc-av', { audio: true }); });
    await waitFor('the data channel to open', () => page.evaluate(() => T.opened === 1 || T.errors.length));
    const errs = await page.evaluate(() => T.errors);
    if (errs.length) throw new Error(errs.join('\n'));
    // A rejected transceiver is stopped (and, in current Chromium, gone from the list).
    const live = await page.evaluate(() => window.pc.getTransceivers()
      .filter((t) => t.currentDirection !== 'stopped' && t.currentDirection !== 'inactive').length);
    if (live !== 0) throw new Error(`${live} audio transceiver(s) still negotiated`);
    const m = await page.evaluate(() => window.pc.remoteDescription.sdp.split('\r\n').filter((l) => l.startsWith('m=')));
    if (m.length !== 2 || !m[0].startsWith('m=audio 0 ')) throw new Error(`the answer's sections: ${m}`);
    const { id } = await publish('rtc-av', { body: Buffer.from('with audio offered'), contentType: 'text/plain' });
    await waitFor('the message', () => page.evaluate(() => T.received.length >= 1));
    const got = await page.evaluate(() => T.received[0]);
    if (got.id !== id || got.data !== 'with audio offered') throw new Error(`got ${JSON.stringify(got)}`);
    await page.evaluate(() => unsubscribe());
    await waitFor('the session to end', async () => (await metric(crier, 'crier_connections{transport="webrtc"}')) === 0);
  });

  await step('one data channel carries three channels; after a teardown their cursor resumes them all', async () => {
    const names = ['rtc-news', 'rtc-ticker', 'rtc-room'];
    // A page's multiplexed subscriber: every message is raw crier.json, first each channel's start.
    const open = (url) => page.evaluate(async (url) => {
      const X = window.X = { got: [], opened: false, errors: [] };
      const pc = new RTCPeerConnection({ iceServers: [] });
      const dc = pc.createDataChannel('crier');
      dc.onopen = () => { X.opened = true; };
      dc.onmessage = (e) => X.got.push(JSON.parse(e.data));
      await pc.setLocalDescription(await pc.createOffer());
      const r = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/sdp' }, body: pc.localDescription.sdp });
      if (r.status !== 201) { X.errors.push(`POST answered ${r.status}: ${await r.text()}`); return; }
      X.resume = r.headers.get('crier-resume');
      await pc.setRemoteDescription({ type: 'answer', sdp: await r.text() });
      window.mpc = pc;
    }, url);
    const got = (n) => waitFor(`${n} data channel messages`, () => page.evaluate((n) => X.got.length >= n || X.errors.length, n), { timeout: 30000 });
    const pick = (m) => (m.subscribed !== undefined ? { subscribed: m.subscribed, id: m.id } : { channel: m.channel, id: m.id, data: m.data });
    const sentTo = [];
    let n = 0;
    const publishN = async (k, on) => {
      const out = [];
      for (let i = 0; i < k; i++, n++) {
        const channel = on[(n * 7 + Math.floor(n / 3)) % on.length];
        const body = `${channel} #${n} ✓`;
        const { id } = await publish(channel, { body: Buffer.from(body), contentType: 'text/plain; charset=utf-8' });
        out.push({ channel, id, data: body });
      }
      sentTo.push(...out);
      return out;
    };
    await open(`/live/${names.join(',')}`);
    await waitFor('the data channel to open', () => page.evaluate(() => X.opened || X.errors.length));
    // `rtc-room` gets nothing before the teardown: its part of the cursor is where it started.
    const first = await publishN(30, names.slice(0, 2));
    await got(33);
    let X = await page.evaluate(() => window.X);
    if (X.errors.length) throw new Error(X.errors.join('\n'));
    const starts = X.got.slice(0, 3).map(pick);
    if (starts.map((s) => s.subscribed).join() !== names.join()) throw new Error(`the session started with ${JSON.stringify(starts)}`);
    assertSame('webrtc multiplexed', X.got.slice(3).map(pick), first);
    const last = Object.fromEntries(starts.map((s) => [s.subscribed, s.id]));
    for (const m of first) last[m.channel] = m.id;

    await page.evaluate(() => window.mpc.close());
    await waitFor('the session to end', async () => (await metric(crier, 'crier_connections{transport="webrtc"}')) === 0);
    const rest = await publishN(30, names);
    const cursor = names.map((c) => last[c]).join(',');
    await open(`/live/${names.join(',')}?last_event_id=${cursor}`);
    await got(33);
    await sleep(500); // a duplicate would arrive now
    X = await page.evaluate(() => window.X);
    if (X.errors.length) throw new Error(X.errors.join('\n'));
    if (X.resume !== 'ok') throw new Error(`Crier-Resume: ${X.resume}`);
    assertSame('webrtc multiplexed starts on resume', X.got.slice(0, 3).map(pick), names.map((c) => ({ subscribed: c, id: last[c] })));
    assertSame('webrtc multiplexed resume (exactly the rest)', X.got.slice(3).map(pick), rest);
    await page.evaluate(() => window.mpc.close());
  });

  await step('crier demo: the message shows up in all four columns, WebRTC included; all four come back after a restart', async () => {
    const demoDir = tempDir('webrtc-demo');
    const config = path.join(demoDir, 'demo.toml');
    fs.writeFileSync(config, [
      '[server]', 'listen = ["127.0.0.1:0"]',
      '[publish]', `unix = "${path.join(demoDir, 'publish.sock')}"`, 'listen = ["127.0.0.1:0"]',
      '[admin]', 'listen = "127.0.0.1:0"',
    ].join('\n'));
    let proc = spawn(crierBin(), ['demo', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CRIER_LOG: 'warn' } });
    const out = [];
    const errs = [];
    readline.createInterface({ input: proc.stderr }).on('line', (l) => errs.push(l));
    readline.createInterface({ input: proc.stdout }).on('line', (l) => out.push(l));
    try {
      const text = () => out.join('\n');
      const pageUrl = await waitFor('the page address', () => /1\. open\s+(\S+)/.exec(text())?.[1], { timeout: 10000 });
      const command = await waitFor('the publish command', () => /2\. publish\s+(.+)/.exec(text())?.[1].trim(), { timeout: 10000 });
      const demo = await browser.newPage();
      demo.on('pageerror', (e) => pageErrors.push(String(e)));
      await demo.goto(pageUrl);
      await waitFor('every column to connect', async () =>
        (await demo.textContent('#state')).includes('connected')
        && (await demo.textContent('#state-ws')) === 'connected'
        && (await demo.textContent('#state-rtc')) === 'connected', { timeout: 15000 });
      await sleep(300); // the long-poll's first request is in
      execSync(command, { cwd: demoDir, timeout: 10000, encoding: 'utf8' });
      for (const col of ['#messages', '#messages-ws', '#messages-lp', '#messages-rtc']) {
        await waitFor(`"hello" in ${col}`, async () => (await demo.textContent(col)).includes('hello'), { timeout: 10000 });
      }
      // A restart on the same address: every column, WebRTC too, notices and comes back.
      const addr = new URL(pageUrl).host;
      proc.kill('SIGTERM');
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
      await waitFor('the WebRTC column to notice', async () => (await demo.textContent('#state-rtc')) !== 'connected', { timeout: 10000 });
      // Down for longer than a retry's wait: the first tries find nobody (a real restart).
      await sleep(4500);
      fs.writeFileSync(config, [
        '[server]', `listen = ["${addr}"]`,
        '[publish]', `unix = "${path.join(demoDir, 'publish.sock')}"`, 'listen = ["127.0.0.1:0"]',
        '[admin]', 'listen = "127.0.0.1:0"',
      ].join('\n'));
      out.length = 0;
      proc = spawn(crierBin(), ['demo', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CRIER_LOG: 'warn' } });
      readline.createInterface({ input: proc.stderr }).on('line', (l) => errs.push(l));
      readline.createInterface({ input: proc.stdout }).on('line', (l) => out.push(l));
      const again = await waitFor('the publish command after the restart', () => /2\. publish\s+(.+)/.exec(text())?.[1].trim(), { timeout: 10000 });
      await waitFor('every column to reconnect', async () =>
        (await demo.textContent('#state')).includes('connected')
        && (await demo.textContent('#state-ws')) === 'connected'
        && (await demo.textContent('#state-rtc')) === 'connected', { timeout: 20000 });
      await sleep(300);
      execSync(again.replace(/"hello"$/, '"after the restart"'), { cwd: demoDir, timeout: 10000, encoding: 'utf8' });
      for (const col of ['#messages', '#messages-ws', '#messages-lp', '#messages-rtc']) {
        await waitFor(`the message after the restart in ${col}`, async () => (await demo.textContent(col)).includes('after the restart'), { timeout: 15000 });
      }
      await demo.close();
    } catch (e) {
      e.message += `\n    demo stdout:\n${out.join('\n')}\n    demo stderr:\n${errs.join('\n')}`;
      throw e;
    } finally {
      proc.kill('SIGTERM');
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
    }
    if (proc.exitCode !== 0) throw new Error(`crier demo exited ${proc.exitCode ?? proc.signalCode} on SIGTERM\n${errs.join('\n')}`);
  });
} finally {
  await browser.close().catch(() => {});
  publish.close();
  const code = await crier.stop();
  upstream.close();
  if (code !== 0) results.push({ name: `crier exited ${code}`, ok: false });
}

const failed = results.filter((r) => !r.ok);
console.log(`${results.length - failed.length} passed, ${failed.length} failed`);
process.exit(failed.length ? 1 : 0);
