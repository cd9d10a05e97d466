// Web Push in a real browser: the `crier demo` page's "Notify me" flow in headless Chromium.
//
//   node tests/e2e/webpush.mjs     (after `cargo build`; `cargo test --test e2e` runs it too)
//
// Headless Chromium here reaches no push service, so `pushManager.subscribe` cannot succeed:
// the test checks that the page says so, then drives the page's own subscribe/unsubscribe code
// with a recorded PushSubscription (the JSON a browser's `toJSON()` gives, its keys made here)
// whose endpoint is an HTTPS push-service double on loopback. The double receives crier's
// request, and this script checks the VAPID header and decrypts the payload (RFC 8291, with
// node:crypto) with the subscription's private key.

import { spawn, execFileSync, execSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

import { CHROMIUM_FLAGS, OUT, crierBin, sleep, tempDir, waitFor } from './harness.mjs';

const LIMIT_MS = 120_000;
const watchdog = setTimeout(() => {
  console.log(`FAILED the Web Push suite did not finish within ${LIMIT_MS / 1000} s`);
  process.exit(1);
}, LIMIT_MS);
watchdog.unref();

const b64url = (b) => Buffer.from(b).toString('base64url');

/**
 * The double's certificate, which crier trusts through `webpush.ca_file`. Not a CA (the
 * harness's is): rustls refuses a CA certificate as a server's own.
 */
function makeCert(dir) {
  const cert = path.join(dir, 'push-cert.pem');
  const key = path.join(dir, 'push-key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=push.test',
    '-addext', 'subjectAltName=IP:127.0.0.1', '-addext', 'basicConstraints=critical,CA:FALSE',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  return { cert, key };
}

/** The push-service double: records every request, answers 201. */
function startPushService(tls) {
  const got = [];
  const server = https.createServer({ cert: fs.readFileSync(tls.cert), key: fs.readFileSync(tls.key) }, (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      got.push({ path: req.url, headers: req.headers, body: Buffer.concat(chunks) });
      res.writeHead(201).end();
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, got, port: server.address().port })));
}

/** A browser's subscription: P-256 keys and an auth secret, as `pushManager.subscribe` makes. */
function recordedSubscription(endpoint) {
  const ecdh = crypto.createECDH('prime256v1');
  ecdh.generateKeys();
  const auth = crypto.randomBytes(16);
  return {
    json: { endpoint, expirationTime: null, keys: { p256dh: b64url(ecdh.getPublicKey()), auth: b64url(auth) } },
    ecdh,
    auth,
  };
}

/** RFC 8291 / RFC 8188 decryption, as the browser does it. */
function decrypt(body, sub) {
  const salt = body.subarray(0, 16);
  const idlen = body[20];
  const asPublic = body.subarray(21, 21 + idlen);
  const ct = body.subarray(21 + idlen);
  const secret = sub.ecdh.computeSecret(asPublic);
  const info = Buffer.concat([Buffer.from('WebPush: info\0'), sub.ecdh.getPublicKey(), asPublic]);
  const ikm = Buffer.from(crypto.hkdfSync('sha256', secret, sub.auth, info, 32));
  const cek = Buffer.from(crypto.hkdfSync('sha256', ikm, salt, Buffer.from('Content-Encoding: aes128gcm\0'), 16));
  const nonce = Buffer.from(crypto.hkdfSync('sha256', ikm, salt, Buffer.from('Content-Encoding: nonce\0'), 12));
  const d = crypto.createDecipheriv('aes-128-gcm', cek, nonce);
  d.setAuthTag(ct.subarray(ct.length - 16));
  const plain = Buffer.concat([d.update(ct.subarray(0, ct.length - 16)), d.final()]);
  let end = plain.length - 1;
  while (end >= 0 && plain[end] === 0) end -= 1;
  if (plain[end] !== 2) throw new Error('no last-record delimiter');
  return JSON.parse(plain.subarray(0, end).toString());
}

const dir = tempDir('webpush');
const tls = makeCert(dir);
const ps = await startPushService(tls);
const vapid = path.join(dir, 'vapid.pem');
execFileSync(crierBin(), ['vapid', 'generate', vapid]);
const config = path.join(dir, 'demo.toml');
fs.writeFileSync(config, [
  '[server]', 'listen = ["127.0.0.1:0"]',
  '[publish]', `unix = "${path.join(dir, 'publish.sock')}"`, 'listen = ["127.0.0.1:0"]',
  '[admin]', 'listen = "127.0.0.1:0"',
  '[webpush]', `vapid_key_file = "${vapid}"`, 'subject = "mailto:ops@example.com"',
  `store = "${path.join(dir, 'webpush.redb')}"`, 'push_hosts = ["127.0.0.1"]', `ca_file = "${tls.cert}"`,
  // The double is on loopback, on a port of its own: crier refuses both unless told.
  'allow_addresses = ["127.0.0.1"]', `push_ports = [${ps.port}]`,
].join('\n'));
const proc = spawn(crierBin(), ['demo', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, CRIER_LOG: 'warn' } });
process.on('exit', () => proc.kill('SIGKILL'));
const out = [];
const errs = [];
readline.createInterface({ input: proc.stdout }).on('line', (l) => out.push(l));
readline.createInterface({ input: proc.stderr }).on('line', (l) => errs.push(l));

let browser;
let failed = false;
try {
  const text = () => out.join('\n');
  const pageUrl = await waitFor('the page address', () => /1\. open\s+(\S+)/.exec(text())?.[1], { timeout: 15000 });
  const command = await waitFor('the publish command', () => /2\. publish\s+(.+)/.exec(text())?.[1].trim(), { timeout: 10000 });
  const admin = new URL(await waitFor('the status page address', () => /status page\s+(\S+)/.exec(text())?.[1], { timeout: 10000 })).host;
  const webpushAdmin = async () => (await fetch(`http://${admin}/webpush`)).json();

  browser = await chromium.launchPersistentContext(tempDir('chromium-webpush'), {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_FLAGS,
  });
  await browser.grantPermissions(['notifications'], { origin: new URL(pageUrl).origin });
  const page = await browser.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(pageUrl);
  await waitFor('the demo page to connect', async () => (await page.textContent('#state')).includes('connected'), { timeout: 10000 });

  // 1. The real flow as far as this browser allows: service worker, permission, key, subscribe.
  await page.click('#notify');
  const said = await waitFor('the page to report the subscription attempt', async () => {
    const t = await page.textContent('#notify-state');
    return /Could not subscribe|Subscribed/.test(t) && t;
  }, { timeout: 20000 });
  const swActive = await page.evaluate(async () => !!(await navigator.serviceWorker.getRegistration())?.active);
  if (!swActive) throw new Error('the service worker (/sw.js) is not active');
  console.log(`    pushManager.subscribe in headless Chromium: ${said}`);
  if (!said.startsWith('Could not subscribe')) throw new Error(`expected no push service here, the page says: ${said}`);
  if ((await webpushAdmin()).subscriptions !== 0) throw new Error('a failed subscribe stored something');

  // 2. The page's own save() with a recorded PushSubscription.
  const sub = recordedSubscription(`https://127.0.0.1:${ps.port}/push/recorded-1`);
  await page.evaluate((json) => webpush.save(json), sub.json);
  await waitFor('the page to say subscribed', async () => (await page.textContent('#notify-state')).startsWith('Subscribed'));
  if (!(await page.isVisible('#stop')) || (await page.isVisible('#notify'))) throw new Error('the buttons did not switch');
  const a = await webpushAdmin();
  if (a.subscriptions !== 1 || a.channels.demo !== 1) throw new Error(`crier holds ${JSON.stringify(a)}`);
  await page.screenshot({ path: path.join(OUT, 'demo-webpush.png'), fullPage: true });

  // 3. A publish reaches the push service, signed and encrypted for this subscription.
  execSync(command.replace(/"hello"$/, '"to the closed page"'), { cwd: dir, timeout: 10000 });
  const req = await waitFor('the push request', () => ps.got[0], { timeout: 15000 }).catch(async (e) => {
    e.message += `; crier's /webpush: ${JSON.stringify(await webpushAdmin())}`;
    throw e;
  });
  if (req.path !== '/push/recorded-1') throw new Error(`pushed to ${req.path}`);
  if (req.headers['content-encoding'] !== 'aes128gcm') throw new Error(`content-encoding ${req.headers['content-encoding']}`);
  const key = await (await fetch(new URL('/_crier/webpush/key', pageUrl))).text();
  if (!req.headers.authorization?.startsWith('vapid t=') || !req.headers.authorization.endsWith(`, k=${key.trim()}`)) {
    throw new Error(`authorization ${req.headers.authorization}`);
  }
  const envelope = decrypt(req.body, sub);
  if (envelope.channel !== 'demo' || envelope.data !== 'to the closed page') throw new Error(`decrypted ${JSON.stringify(envelope)}`);
  console.log(`    the push service got ${req.body.length} bytes; decrypted: ${JSON.stringify(envelope)}`);

  // 4. After a reload the page remembers; "Stop notifications" deletes it at crier.
  await page.reload();
  await waitFor('the stop button after a reload', () => page.isVisible('#stop'));
  await page.click('#stop');
  await waitFor('the page to say off', async () => (await page.textContent('#notify-state')) === 'Notifications off.');
  const after = await webpushAdmin();
  if (after.subscriptions !== 0) throw new Error(`still held after unsubscribe: ${JSON.stringify(after)}`);
  execSync(command.replace(/"hello"$/, '"nobody listens"'), { cwd: dir, timeout: 10000 });
  await sleep(1000);
  if (ps.got.length !== 1) throw new Error(`pushed ${ps.got.length} times; the unsubscribed endpoint was tried again`);
  if (pageErrors.length) throw new Error(`script errors on the page: ${pageErrors.join('; ')}`);
  console.log('ok     web push: the demo page subscribes (recorded subscription), gets a message, unsubscribes');
} catch (e) {
  failed = true;
  console.log(`FAILED web push\n${String(e.stack || e).replace(/^/gm, '    ')}\n    demo stdout:\n${out.join('\n')}\n    demo stderr:\n${errs.join('\n')}`);
} finally {
  await browser?.close();
  ps.server.close();
  proc.kill('SIGTERM');
  await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
}
if (!failed && proc.exitCode !== 0) {
  console.log(`FAILED crier demo exited ${proc.exitCode ?? proc.signalCode} on SIGTERM`);
  failed = true;
}
process.exit(failed ? 1 : 0);
