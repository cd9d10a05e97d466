// crier end to end with a real browser: headless Debian Chromium, driven by playwright-core.
//
//   node tests/e2e/run.mjs        (after `cargo build`; `cargo test --test e2e` runs it too)
//
// Env: CRIER_BIN (default target/debug/crier), CHROMIUM (default /usr/bin/chromium),
// CRIER_E2E_OUT (artifacts, default target/e2e), CRIER_E2E_DOCS=1 (also refresh the README's
// screenshots under docs/), CRIER_E2E_ONLY=<regex> (run only the steps whose name matches).
//
// What it proves, over plain HTTP/1.1 and over HTTPS (where SSE runs over HTTP/2):
// - a page served by an upstream app through crier subscribes with EventSource, WebSocket
//   (plain and `crier.json`) and a fetch long-poll loop; 200 messages published on the Unix
//   socket arrive at every client, in order, byte-identical (SSE: as an EventSource must read
//   them, CR and CRLF as LF; every other transport byte for byte);
// - a network cut (a TCP forwarder between Chromium and crier resets every connection and
//   refuses new ones) while publishing goes on: EventSource (Last-Event-ID, by itself),
//   crier.json WebSocket (?last_event_id=) and long-poll (If-None-Match) miss nothing and
//   get nothing twice; the plain WebSocket, which has no ids, gets everything after it is back;
// - one EventSource on three channels (`/live/a,b,c`): crier.json envelopes naming their channel,
//   in publish order; after a network cut it resumes by itself with the compound cursor as
//   Last-Event-ID, and every message arrives exactly once; the README's multiplexed WebSocket
//   snippet, run as printed, does the same with its own reconnect and a `subscribe`;
// - the admin status page updates live over SSE, with no polling, and its numbers move;
// - `crier demo` prints a page and a command, and the message shows up on the page; two
//   pages chat through its chat box (a WebSocket location with client_messages = "publish");
// - [[publish_on]]: a page that only opens an EventSource updates when another tab submits a
//   form through crier (the app has no push code).

import { spawn, execSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

import {
  CHROMIUM_FLAGS, MAX_MESSAGE, OUT, REPO, assertSame, crierBin, expected, makeCert, makeMessages,
  publisher, sleep, startCrier, startForwarder, startUpstream, tempDir, waitFor,
} from './harness.mjs';

const SUITE_LIMIT_MS = 170_000;
const results = [];
const t0 = Date.now();

const only = process.env.CRIER_E2E_ONLY ? new RegExp(process.env.CRIER_E2E_ONLY) : null;

/** Script errors on any page fail the step they happen in. */
const pageErrors = [];

async function step(name, fn) {
  if (only && !only.test(name)) return;
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

// The whole suite is bounded: a hang anywhere fails it instead of stalling CI.
const watchdog = setTimeout(() => {
  console.log(`FAILED the suite did not finish within ${SUITE_LIMIT_MS / 1000} s`);
  process.exit(1);
}, SUITE_LIMIT_MS);
watchdog.unref();

fs.mkdirSync(OUT, { recursive: true });
const dir = tempDir('browser');
const tls = makeCert(dir);
const upstream = await startUpstream();
const crier = await startCrier({
  upstream: upstream.url,
  dir,
  tls,
  extra: [
    '[channels]',
    'buffer_messages = 1000',
    `max_message_size = "${MAX_MESSAGE / 1024}KiB"`,
    '[[push]]',
    'path = "/live/{channel}"',
    'keepalive = "5s"',
    'longpoll_timeout = "10s"',
    '[[publish_on]]',
    'path = "/api/orders/{id}"',
    'channel = "orders.{id}"',
    'body = "request"',
  ].join('\n'),
});
process.on('exit', () => crier.proc.kill('SIGKILL')); // never leave crier behind
const publish = publisher(crier.unix);
const plainFwd = await startForwarder(crier.port);
const tlsFwd = await startForwarder(crier.tlsPort);
console.log(`crier: public ${crier.public}, TLS ${crier.tls}, admin ${crier.admin}; forwarders :${plainFwd.port} (http) :${tlsFwd.port} (https)`);

const userDataDir = tempDir('chromium');
const browser = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: CHROMIUM_FLAGS,
  ignoreHTTPSErrors: true,
  viewport: { width: 1000, height: 640 },
});
console.log(`chromium ${browser.browser()?.version() ?? ''} started in ${((Date.now() - t0) / 1000).toFixed(1)} s`);

async function newPage() {
  const page = await browser.newPage();
  page.on('pageerror', (e) => pageErrors.push(`${page.url()}: ${e.message}`));
  return page;
}

/** Opens the test page for `channel` through a forwarder, with the protocol of each response recorded. */
async function openPage(scheme, fwd, channel) {
  const page = await newPage();
  const protocols = [];
  const cdp = await browser.newCDPSession(page);
  await cdp.send('Network.enable');
  cdp.on('Network.responseReceived', (e) => {
    if (e.response.url.includes('/live/')) protocols.push({ type: e.type, protocol: e.response.protocol });
  });
  await page.goto(`${scheme}://127.0.0.1:${fwd.port}/?channel=${channel}`);
  return { page, protocols };
}

/** Waits until crier itself counts the page's subscribers on `channel`. */
async function subscribed(channel, want = { websocket: 2, sse: 1, longpoll: 1 }) {
  await waitFor(`subscribers on ${channel} (want ${JSON.stringify(want)})`, async () => {
    const c = await crier.channel(channel);
    const by = c?.subscribers_by_transport;
    return by && by.websocket === want.websocket && by.sse === want.sse && by.longpoll === want.longpoll;
  });
}

async function publishAll(channel, msgs, pauseMs = 0) {
  const sent = [];
  for (const m of msgs) {
    const r = await publish(channel, m);
    sent.push({ ...m, id: r.id });
    if (pauseMs) await sleep(pauseMs);
  }
  return sent;
}

const state = (page) => page.evaluate(() => window.T);

async function received(page, counts, what) {
  await waitFor(what, async () => {
    const c = await page.evaluate(() => ({ sse: T.sse.length, ws: T.ws.length, wsj: T.wsj.length, lp: T.lp.length }));
    return Object.entries(counts).every(([k, n]) => c[k] >= n);
  }, { timeout: 30000 });
  await sleep(300); // anything extra (a duplicate) would arrive now
  return state(page);
}

async function screenshot(page, name) {
  const file = path.join(OUT, name);
  await page.screenshot({ path: file, fullPage: true });
  // The README's pictures come from the demo: what a newcomer sees.
  const docs = { 'demo.png': 'demo.png', 'demo-status.png': 'status.png' }[name];
  if (process.env.CRIER_E2E_DOCS === '1' && docs) {
    fs.mkdirSync(path.join(REPO, 'docs'), { recursive: true });
    fs.copyFileSync(file, path.join(REPO, 'docs', docs));
  }
}

/** 200 messages, every client, byte-identical and in order. */
async function delivery(scheme, fwd) {
  const channel = `${scheme}-delivery`;
  const { page, protocols } = await openPage(scheme, fwd, channel);
  await subscribed(channel);
  const msgs = makeMessages(200, scheme, { big: 100 });
  const sent = await publishAll(channel, msgs);
  await publish(channel, { body: Buffer.alloc(MAX_MESSAGE + 1, 0x61), contentType: 'text/plain', expectStatus: 413 });
  const T = await received(page, { sse: 200, ws: 200, wsj: 200, lp: 200 }, `200 messages at every client on ${channel}`);
  const want = expected(sent);
  for (const k of ['sse', 'ws', 'wsj', 'lp']) assertSame(`${scheme} ${k}`, T[k], want[k]);
  if (T.resume.some((r) => r !== 'ok')) throw new Error(`long-poll saw Crier-Resume ${JSON.stringify([...new Set(T.resume)])}`);
  const sse = protocols.filter((p) => p.type === 'EventSource').map((p) => p.protocol);
  const lp = protocols.filter((p) => p.type === 'Fetch').map((p) => p.protocol);
  const wantProto = scheme === 'https' ? 'h2' : 'http/1.1';
  if (!sse.length || sse.some((p) => p !== wantProto)) throw new Error(`EventSource went over ${JSON.stringify(sse)}, want ${wantProto}`);
  if (!lp.length || lp.some((p) => p !== wantProto)) throw new Error(`long-poll went over ${JSON.stringify([...new Set(lp)])}, want ${wantProto}`);
  console.log(`    EventSource over ${sse[0]}, long-poll over ${lp[0]} (${lp.length} requests)`);
  await screenshot(page, `page-${scheme}-delivery.png`);
  await page.close();
}

/** Publish, cut the network, publish on, restore: nothing lost, nothing twice. */
async function resume(scheme, fwd) {
  const channel = `${scheme}-resume`;
  const { page } = await openPage(scheme, fwd, channel);
  await subscribed(channel);
  const all = makeMessages(150, `${scheme}-resume`);
  const before = await publishAll(channel, all.slice(0, 50));
  await received(page, { sse: 50, ws: 50, wsj: 50, lp: 50 }, 'the first 50 messages');
  const opens = (await state(page)).opens;

  fwd.cut();
  await waitFor('the page to see the cut', async () => {
    const o = await page.evaluate(() => T.open);
    return !o.sse && !o.ws && !o.wsj;
  }, { timeout: 10000 });
  const during = await publishAll(channel, all.slice(50, 100), 10);
  await sleep(500);
  fwd.restore();

  // EventSource retries after crier's `retry:` hint (2 s); the page's WebSockets back off to 1 s.
  await waitFor('every client to be back', async () => {
    const T = await page.evaluate(() => ({ open: T.open, opens: T.opens }));
    return T.open.sse && T.open.ws && T.open.wsj && ['sse', 'ws', 'wsj'].every((k) => T.opens[k] > opens[k]);
  }, { timeout: 15000 });
  await subscribed(channel);
  const after = await publishAll(channel, all.slice(100));

  const T = await received(page, { sse: 150, wsj: 150, lp: 150, ws: 100 }, 'all 150 messages after the cut');
  const everything = expected([...before, ...during, ...after]);
  assertSame(`${scheme} sse (resumed by EventSource itself)`, T.sse, everything.sse);
  assertSame(`${scheme} wsj (resumed with ?last_event_id)`, T.wsj, everything.wsj);
  assertSame(`${scheme} lp (resumed with If-None-Match)`, T.lp, everything.lp);
  assertSame(`${scheme} ws (plain: from what came next)`, T.ws, expected([...before, ...after]).ws);
  if (T.resume.some((r) => r !== 'ok')) throw new Error(`long-poll saw Crier-Resume ${JSON.stringify([...new Set(T.resume)])}`);
  console.log(`    reconnects: ${JSON.stringify(T.opens)}; ${T.log.filter((l) => /open|closed/.test(l)).length} open/close events`);
  await screenshot(page, `page-${scheme}-resume.png`);
  await page.close();
}

/**
 * One EventSource on three channels (`/live/a,b,c`): every message arrives as a crier.json
 * envelope naming its channel, in publish order; the network is cut while publishing goes on,
 * EventSource reconnects by itself with the compound cursor as Last-Event-ID, and every message
 * arrives exactly once, in order per channel (and, one node, across channels).
 */
async function multiplexed(fwd) {
  const names = ['mux-news', 'mux-ticker', 'mux-room'];
  const page = await newPage();
  const cdp = await browser.newCDPSession(page);
  await cdp.send('Network.enable');
  const lastEventIds = []; // the Last-Event-ID of each EventSource request, as Chromium sent it
  const note = (h) => {
    const v = Object.entries(h || {}).find(([k]) => k.toLowerCase() === 'last-event-id');
    return v ? v[1] : null;
  };
  const seen = new Map();
  cdp.on('Network.requestWillBeSent', (e) => {
    if (e.type === 'EventSource') seen.set(e.requestId, note(e.request.headers));
  });
  // Chromium adds Last-Event-ID below the page's view of the request: the extra info has it.
  cdp.on('Network.requestWillBeSentExtraInfo', (e) => {
    const v = note(e.headers);
    if (seen.has(e.requestId) || v) lastEventIds.push({ id: e.requestId, v });
  });
  await page.goto(`http://127.0.0.1:${fwd.port}/blank`);
  await page.evaluate((url) => {
    const M = window.M = { ev: [], gaps: [], deleted: [], open: false, opens: 0 };
    const es = new EventSource(url);
    es.onopen = () => { M.open = true; M.opens += 1; };
    es.onerror = () => { M.open = false; };
    es.onmessage = (e) => M.ev.push({ cursor: e.lastEventId, env: JSON.parse(e.data) });
    es.addEventListener('crier.gap', (e) => M.gaps.push(e.data));
    es.addEventListener('crier.deleted', (e) => M.deleted.push(e.data));
  }, `/live/${names.join(',')}`);
  const subscribedAll = () => waitFor('the EventSource on all three channels', async () => {
    for (const n of names) {
      if ((await crier.channel(n))?.subscribers_by_transport?.sse !== 1) return false;
    }
    return true;
  });
  await subscribedAll();
  const count = () => page.evaluate(() => M.ev.length);
  const all = makeMessages(150, 'mux');
  const sent = [];
  const publishRange = async (from, to, pauseMs = 0) => {
    for (let i = from; i < to; i++) {
      const channel = names[(i * 7 + Math.floor(i / 3)) % 3];
      const r = await publish(channel, all[i]);
      sent.push({ ...all[i], channel, id: r.id });
      if (pauseMs) await sleep(pauseMs);
    }
  };
  await publishRange(0, 50);
  await waitFor('the first 50 messages', async () => (await count()) >= 50, { timeout: 30000 });
  const before = await page.evaluate(() => ({ opens: M.opens, cursor: M.ev[M.ev.length - 1].cursor }));

  fwd.cut();
  await waitFor('the EventSource to see the cut', async () => !(await page.evaluate(() => M.open)), { timeout: 10000 });
  await publishRange(50, 100, 10);
  await sleep(500);
  fwd.restore();
  await waitFor('the EventSource to reconnect by itself', async () => (await page.evaluate(() => M.open && M.opens)) > before.opens, { timeout: 15000 });
  await subscribedAll();
  await publishRange(100, 150);
  await waitFor('all 150 messages', async () => (await count()) >= 150, { timeout: 30000 });
  await sleep(300); // a duplicate would arrive now
  const M = await page.evaluate(() => window.M);

  // What each envelope must be: the channel as named, the message's id, its event, the body
  // (text as sent, CR included: the envelope is JSON; binary as data_b64).
  const want = sent.map((m) => {
    let text = null;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(m.body);
    } catch {}
    return text !== null ? { channel: m.channel, id: m.id, event: m.event, data: text } : { channel: m.channel, id: m.id, event: m.event, data_b64: m.body.toString('base64') };
  });
  assertSame('multiplexed EventSource (envelopes, in publish order, exactly once)', M.ev.map((e) => e.env), want);
  if (M.gaps.length || M.deleted.length) throw new Error(`unexpected notices: gaps ${JSON.stringify(M.gaps)}, deleted ${JSON.stringify(M.deleted)}`);
  // Each event's id is the compound cursor: after message k, each channel's part is the id of
  // its last message so far.
  const pos = {};
  for (let k = 0; k < M.ev.length; k++) {
    pos[sent[k].channel] = sent[k].id;
    const parts = M.ev[k].cursor.split(',');
    if (parts.length !== 3) throw new Error(`event ${k}: cursor ${M.ev[k].cursor} has ${parts.length} parts`);
    names.forEach((n, j) => {
      if (pos[n] && parts[j] !== pos[n]) throw new Error(`event ${k}: cursor ${M.ev[k].cursor}, part ${j} should be ${pos[n]}`);
    });
  }
  // The reconnect named that cursor itself (no page code is involved).
  const resumedWith = lastEventIds.map((x) => x.v).filter(Boolean);
  if (!resumedWith.includes(before.cursor)) {
    throw new Error(`no EventSource request carried Last-Event-ID ${before.cursor}; seen ${JSON.stringify(resumedWith)}`);
  }
  console.log(`    3 channels on one EventSource, ${M.opens} opens, resumed with Last-Event-ID ${before.cursor}`);
  await page.close();
}

/**
 * The README's multiplexed WebSocket snippet, run as printed (over HTTPS, as its `wss://` says):
 * two channels, a third added with `{"subscribe"}`, a network cut, the snippet's own reconnect
 * with the cursor; every message shown exactly once, in publish order.
 */
async function readmeWebSocket(fwd) {
  const readme = fs.readFileSync(path.join(REPO, 'README.md'), 'utf8');
  const start = readme.indexOf("// WebSocket (crier.json): keep each channel's last id");
  if (start < 0) throw new Error('the README has no multiplexed WebSocket snippet');
  const snippet = readme.slice(start, readme.indexOf('```', start));
  const page = await newPage();
  await page.goto(`https://127.0.0.1:${fwd.port}/blank`);
  await page.addScriptTag({
    content: `window.S = { shown: [], refetched: [] };
      function show(channel, data) { S.shown.push([channel, data]); }
      function refetch(channel) { S.refetched.push(channel); }
      ${snippet}`,
  });
  const on = (channel) => waitFor(`the snippet's WebSocket on ${channel}`, async () => (await crier.channel(channel))?.subscribers_by_transport?.websocket === 1);
  await on('news');
  await on('ticker');
  const sent = [];
  let n = 0;
  const publishOn = async (names, count, pauseMs = 0) => {
    for (let i = 0; i < count; i++, n++) {
      const channel = names[(n * 7 + Math.floor(n / 3)) % names.length];
      const body = `${channel} #${n} ✓`;
      await publish(channel, { body: Buffer.from(body), contentType: 'text/plain; charset=utf-8' });
      sent.push([channel, body]);
      if (pauseMs) await sleep(pauseMs);
    }
  };
  const shown = (k) => waitFor(`${k} messages shown`, async () => (await page.evaluate(() => S.shown.length)) >= k, { timeout: 30000 });
  await publishOn(['news', 'ticker'], 30);
  await shown(30);
  // What the snippet's "later:" line does: a third channel on the open connection.
  await page.evaluate(() => ws.send(JSON.stringify({ subscribe: 'room:42', last_event_id: last['room:42'] })));
  await waitFor('room:42 in the snippet\'s channel list', () => page.evaluate(() => channels.includes('room:42') && !!last['room:42']));
  const three = ['news', 'ticker', 'room:42'];
  await publishOn(three, 15);
  await shown(45);

  fwd.cut();
  await waitFor('the WebSocket to see the cut', () => page.evaluate(() => ws.readyState === WebSocket.CLOSED), { timeout: 10000 });
  await publishOn(three, 30, 10);
  await sleep(500);
  fwd.restore();
  await waitFor('the snippet to reconnect', () => page.evaluate(() => ws.readyState === WebSocket.OPEN), { timeout: 15000 });
  for (const c of three) await on(c);
  await publishOn(three, 15);
  await shown(sent.length);
  await sleep(300); // a duplicate would arrive now
  const S = await page.evaluate(() => window.S);
  const url = await page.evaluate(() => ws.url);
  assertSame('README WebSocket snippet', S.shown.map(([c, d]) => ({ c, d })), sent.map(([c, d]) => ({ c, d })));
  if (S.refetched.length) throw new Error(`the snippet was told of gaps on ${S.refetched}`);
  if (!/\/live\/news,ticker,room(:|%3A)42\?last_event_id=[0-9-]+,[0-9-]+,[0-9-]+$/.test(url)) throw new Error(`the snippet reconnected to ${url}`);
  console.log(`    reconnected to ${new URL(url).pathname}${new URL(url).search}`);
  await page.close();
}

async function statusPage() {
  const page = await newPage();
  const cdp = await browser.newCDPSession(page);
  await cdp.send('Network.enable');
  const requests = [];
  cdp.on('Network.requestWillBeSent', (e) => requests.push(new URL(e.request.url).pathname));
  await page.goto(`http://${crier.admin}/`);
  const num = async (id) => Number((await page.textContent(`#${id}`)).replace(/[^0-9.]/g, ''));
  await waitFor('the first snapshot', async () => Number(await page.getAttribute('body', 'data-snapshots')) >= 1);
  const total0 = await num('msg-total');

  // Subscribers that are not the browser: three SSE streams and a long-poll on one channel.
  const channel = 'status-check';
  const held = [];
  for (let i = 0; i < 3; i++) {
    const ac = new AbortController();
    const r = await fetch(`http://${crier.public}/live/${channel}`, { headers: { accept: 'text/event-stream' }, signal: ac.signal });
    held.push(ac);
    r.body.getReader().read().catch(() => {});
  }
  const lpAbort = new AbortController();
  fetch(`http://${crier.public}/live/${channel}`, { signal: lpAbort.signal }).catch(() => {});
  held.push(lpAbort);

  // What /metrics says now; streams of the steps before may still be closing, so the page is
  // held to the server's figure, not to a count taken earlier.
  const sseMetric = async () => {
    const text = await (await fetch(`http://${crier.admin}/metrics`)).text();
    const m = text.match(/^crier_connections\{transport="sse"\} (\d+)$/m);
    return m ? Number(m[1]) : NaN;
  };
  await waitFor('the channel row', async () => {
    const row = await page.$(`tr[data-channel="${channel}"]`);
    return row && (await row.textContent()).includes('4');
  }, { timeout: 10000 });
  await waitFor('the SSE count to move', async () => {
    const now = await sseMetric();
    return now >= 3 && (await num('conn-sse')) === now;
  }, { timeout: 10000 });
  // A steady trickle of messages: the rate must show it.
  const rates = [];
  for (let i = 0; i < 25; i++) {
    await publish(channel, { body: Buffer.from(`tick ${i}`), contentType: 'text/plain' });
    await sleep(80);
    rates.push(await num('msg-rate'));
  }
  await waitFor('the published total to move', async () => (await num('msg-total')) >= total0 + 25, { timeout: 5000 });
  if (!rates.some((r) => r > 0)) throw new Error(`the message rate never moved: ${rates}`);
  await screenshot(page, 'status.png');
  const withOurs = await sseMetric();
  for (const ac of held) ac.abort();
  await waitFor('the SSE count to fall back', async () => {
    const now = await sseMetric();
    return now <= withOurs - 3 && (await num('conn-sse')) === now;
  }, { timeout: 10000 });

  // Live, not polled: the page made one stats request; snapshots kept coming on it.
  const snapshots = Number(await page.getAttribute('body', 'data-snapshots'));
  const stats = requests.filter((p) => p.startsWith('/stats'));
  const other = requests.filter((p) => p !== '/' && p !== '/favicon.ico' && !p.startsWith('/stats'));
  if (stats.length !== 1 || other.length) throw new Error(`the page made these requests: ${JSON.stringify(requests)}; want one /stats/stream`);
  if (snapshots < 3) throw new Error(`only ${snapshots} snapshots arrived`);
  console.log(`    ${snapshots} snapshots over one /stats/stream; rates seen ${Math.max(...rates)}/s`);
  await page.close();
}

async function demo() {
  const demoDir = tempDir('demo');
  const config = path.join(demoDir, 'demo.toml');
  fs.writeFileSync(config, [
    '[server]', 'listen = ["127.0.0.1:0"]',
    '[publish]', `unix = "${path.join(demoDir, 'publish.sock')}"`, 'listen = ["127.0.0.1:0"]',
    '[admin]', 'listen = "127.0.0.1:0"',
  ].join('\n'));
  const proc = spawn(crierBin(), ['demo', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CRIER_LOG: 'warn' } });
  const out = [];
  const errs = [];
  readline.createInterface({ input: proc.stderr }).on('line', (l) => errs.push(l));
  readline.createInterface({ input: proc.stdout }).on('line', (l) => out.push(l));
  try {
    const text = () => out.join('\n');
    const pageUrl = await waitFor('the page address on stdout', () => /1\. open\s+(\S+)/.exec(text())?.[1], { timeout: 10000 });
    const command = await waitFor('the publish command on stdout', () => /2\. publish\s+(.+)/.exec(text())?.[1].trim(), { timeout: 10000 });
    console.log(`    crier demo printed: open ${pageUrl}; run ${command}`);
    const page = await newPage();
    await page.goto(pageUrl);
    await waitFor('the demo page to connect', async () => (await page.textContent('#state')).includes('connected'), { timeout: 10000 });
    // What a newcomer does: run the printed command as printed.
    const answer = execSync(command, { cwd: demoDir, timeout: 10000, encoding: 'utf8' });
    if (!/"channel":"demo"/.test(answer)) throw new Error(`the publish command printed ${answer}`);
    await waitFor('"hello" on the demo page', async () => (await page.textContent('#messages')).includes('hello'), { timeout: 10000 });
    execSync(command.replace(/"hello"$/, '"Push for any app: no code change, one HTTP request to publish."'), { cwd: demoDir, timeout: 10000 });
    await waitFor('the second message', async () => (await page.$$('#messages li')).length === 2, { timeout: 10000 });
    await sleep(1300); // let the new-message highlight fade
    await screenshot(page, 'demo.png');

    // The chat box: two pages, each a crier.json WebSocket that publishes what is typed
    // (client_messages = "publish"); each line reaches both pages once, with one id.
    const other = await newPage();
    await other.goto(pageUrl);
    for (const p of [page, other]) {
      await waitFor('the chat box to connect', async () => (await p.textContent('#state-chat')).includes('connected'), { timeout: 10000 });
    }
    const say = async (p, text) => {
      await p.fill('#chat-input', text);
      await p.click('#chat-form button');
    };
    const lines = async (p) => p.$$eval('#messages-chat li', (lis) => lis.map((li) => [li.dataset.id, li.textContent]).reverse());
    await say(page, 'hello from page one');
    await say(other, 'and hello from page two');
    for (const p of [page, other]) {
      await waitFor('both chat lines on both pages', async () => (await lines(p)).length === 2, { timeout: 10000 });
    }
    const [one, two] = [await lines(page), await lines(other)];
    const texts = JSON.stringify(one.map((l) => l[1]).sort());
    if (texts !== JSON.stringify(['and hello from page two', 'hello from page one'])) throw new Error(`chat lines: ${texts}`);
    if (JSON.stringify(one) !== JSON.stringify(two)) throw new Error(`the pages differ: ${JSON.stringify(one)} vs ${JSON.stringify(two)}`);
    if (one.some((l) => !l[0])) throw new Error(`a chat line without an id: ${JSON.stringify(one)}`);
    await other.close();

    const statusUrl = await waitFor('the status page address on stdout', () => /status page\s+(\S+)/.exec(text())?.[1], { timeout: 1000 });
    const status = await newPage();
    await status.goto(statusUrl);
    await waitFor('the demo channel on the status page', async () => {
      const row = await status.$('tr[data-channel="demo"]');
      return row && (await status.textContent('#conn-sse')) === '1' && Number(await status.getAttribute('body', 'data-snapshots')) >= 2;
    }, { timeout: 10000 });
    await screenshot(status, 'demo-status.png');
    await status.close();
    await page.close();
  } catch (e) {
    e.message += `\n    demo stdout:\n${out.join('\n')}\n    demo stderr:\n${errs.join('\n')}`;
    throw e;
  } finally {
    proc.kill('SIGTERM');
    await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
  }
  if (proc.exitCode !== 0) throw new Error(`crier demo exited ${proc.exitCode ?? proc.signalCode} on SIGTERM\n${errs.join('\n')}`);
}

/** A page that only opens an EventSource updates when another tab submits a form through crier. */
async function publishOn() {
  const board = await newPage();
  await board.goto(`http://127.0.0.1:${plainFwd.port}/board`);
  await waitFor('the board subscribed', async () => (await crier.channel('orders.7'))?.subscribers === 1);
  const form = await newPage();
  await form.goto(`http://127.0.0.1:${plainFwd.port}/order`);
  await form.fill('#item', 'green tea');
  await Promise.all([form.waitForSelector('#saved'), form.click('#send')]);
  await waitFor('the order on the board', async () =>
    (await board.$$eval('#orders li', (li) => li.map((l) => l.textContent))).includes('item=green+tea'));
  await form.close();
  await board.close();
}

await step('http: 200 messages to EventSource, WebSocket, WebSocket crier.json and long-poll, byte-identical', () => delivery('http', plainFwd));
await step('http: network cut; every client resumes without loss', () => resume('http', plainFwd));
await step('http: one EventSource on three channels; network cut; resumes by itself with the compound cursor', () => multiplexed(plainFwd));
await step('https: 200 messages to every client, SSE and long-poll over HTTP/2', () => delivery('https', tlsFwd));
await step('https: network cut; every client resumes without loss', () => resume('https', tlsFwd));
await step("https: the README's multiplexed WebSocket snippet, a subscribe, a network cut, its resume", () => readmeWebSocket(tlsFwd));
await step('status page: live over SSE, numbers move', statusPage);
await step('crier demo: the printed command shows up on the printed page; two pages chat', demo);
await step('publish_on: a page with only an EventSource updates when another tab submits a form', publishOn);

await browser.close();
publish.close();
plainFwd.close();
tlsFwd.close();
upstream.close();
const code = await crier.stop();
if (code !== 0) results.push({ name: `crier exit status ${code} on SIGTERM`, ok: false });
const failed = results.filter((r) => !r.ok);
if (failed.length) {
  fs.writeFileSync(path.join(OUT, 'crier.log'), crier.log.join('\n'));
  console.log(`crier's log: ${path.join(OUT, 'crier.log')}`);
}
fs.rmSync(userDataDir, { recursive: true, force: true });
fs.rmSync(dir, { recursive: true, force: true });
console.log(`screenshots in ${OUT}; ${((Date.now() - t0) / 1000).toFixed(1)} s in all`);
console.log(`browser: ${results.length - failed.length} passed, ${failed.length} failed`);
process.exit(failed.length ? 1 : 0);
