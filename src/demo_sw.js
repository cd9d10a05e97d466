// crier's Web Push service worker (the demo serves it at /sw.js; copy it for your site).
// Each push is crier's JSON envelope {"channel","id","event","data"}; a message too large for
// a push payload comes as {"channel","id","truncated":true} and is fetched by id with one
// long-poll request to the channel's push location (here /live/{channel}).
self.addEventListener('push', (event) => {
  event.waitUntil((async () => {
    const msg = event.data ? event.data.json() : {};
    let body = msg.data ?? (msg.data_b64 !== undefined ? '(binary message)' : '');
    if (msg.truncated) body = await fetchMessage(msg.channel, msg.id);
    await self.registration.showNotification(msg.event || `crier: ${msg.channel}`, {
      body,
      tag: msg.id,
      data: msg,
    });
  })());
});

// The message with id `ms-seq`: long-poll for the first message after the id just before it.
async function fetchMessage(channel, id) {
  const [ms, seq] = id.split('-').map(BigInt);
  const before = seq > 0n ? `${ms}-${seq - 1n}` : `${ms - 1n}-18446744073709551615`;
  const r = await fetch(`/live/${encodeURIComponent(channel)}?last_event_id=${before}`, { credentials: 'include' });
  return r.ok ? r.text() : '(a message too large for a notification: open the page)';
}

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil(self.clients.openWindow('/'));
});
