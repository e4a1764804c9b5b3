#!/usr/bin/env node
// The measuring client of the stress case of `cmcs bench gateway` (bench/stress.py): subscribes to
// every variable of a list and counts the data changes it receives, with their latency.
//
//   node bench_client.mjs --endpoint URL --ids FILE [--user NAME --password PW] [--publishing-ms 500]
//        [--queue-size 4] [--warmup-s 3] [--window-s 10] [--items-per-subscription 7000]
//
// FILE: {"namespace": URI, "ids": [string identifiers]}. Security None (the benchmark's loopback
// endpoint, as for the rest of `cmcs bench gateway`). Latency of a notification: its arrival here
// minus its SourceTimestamp (the time the server's source produced the value: the gateway's device
// read, node-opcua's setValueFromSource), both on this machine's clock.
// node-opcua decodes several times faster than asyncua's Python client, which could not count past
// ~9k notifications/s on one core: the client must not be the bottleneck it measures.
//
// Prints {"recording": true} on stdout when the window starts, then one JSON object: {"ok": true, "count", "window_s", "updates_per_s",
// "latency_p50_s", "latency_p99_s", "subscribe_s", "items"} or {"ok": false, "error"}.

import fs from "node:fs";
import {
  AttributeIds, ClientMonitoredItemGroup, ClientSubscription, MessageSecurityMode, OPCUAClient, SecurityPolicy,
  TimestampsToReturn, UserTokenType,
} from "node-opcua-client";

const writeStdout = process.stdout.write.bind(process.stdout);
for (const k of ["log", "info", "warn", "debug", "trace"]) {
  console[k] = (...a) => process.stderr.write(a.map(String).join(" ") + "\n");
}

function args(argv) {
  const o = { publishingMs: 500, queueSize: 4, warmupS: 3, windowS: 10, perSub: 7000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i], v = argv[i + 1];
    if (a === "--endpoint") { o.endpoint = v; i++; }
    else if (a === "--ids") { o.ids = v; i++; }
    else if (a === "--user") { o.user = v; i++; }
    else if (a === "--password") { o.password = v; i++; }
    else if (a === "--publishing-ms") { o.publishingMs = Number(v); i++; }
    else if (a === "--queue-size") { o.queueSize = Number(v); i++; }
    else if (a === "--warmup-s") { o.warmupS = Number(v); i++; }
    else if (a === "--window-s") { o.windowS = Number(v); i++; }
    else if (a === "--items-per-subscription") { o.perSub = Number(v); i++; }
  }
  return o;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const o = args(process.argv.slice(2));
  const spec = JSON.parse(fs.readFileSync(o.ids, "utf8"));
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 3, initialDelay: 200 }, requestedSessionTimeout: 600000,
    transportSettings: { maxMessageSize: 0, maxChunkCount: 0 },
  });
  await client.connect(o.endpoint);
  const session = await client.createSession(o.user ? { type: UserTokenType.UserName, userName: o.user, password: o.password } : undefined);
  const nsArray = await session.readNamespaceArray();
  const ns = nsArray.indexOf(spec.namespace);
  if (ns < 0) throw new Error(`namespace ${spec.namespace} not on the server`);
  let recording = false, count = 0;
  const latencies = [];
  const onRaw = (msg) => {
    if (!recording) return;
    const now = Date.now();
    for (const n of msg.notificationData || []) {
      const items = n && n.monitoredItems;
      if (!items) continue;
      count += items.length;
      for (const it of items) {
        const ts = it.value && it.value.sourceTimestamp;
        if (ts) latencies.push(now - ts.getTime());
      }
    }
  };
  const t0 = Date.now();
  const subs = [];
  for (let s = 0; s < spec.ids.length; s += o.perSub) {
    const sub = ClientSubscription.create(session, {
      requestedPublishingInterval: o.publishingMs, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
      maxNotificationsPerPublish: 0, publishingEnabled: true, priority: 1,
    });
    await new Promise((resolve, reject) => { sub.once("started", resolve); sub.once("internal_error", reject); });
    sub.on("raw_notification", onRaw);
    subs.push(sub);
    const part = spec.ids.slice(s, s + o.perSub);
    for (let c = 0; c < part.length; c += 1000) {
      const items = part.slice(c, c + 1000).map((id) => ({ nodeId: `ns=${ns};s=${id}`, attributeId: AttributeIds.Value }));
      const group = ClientMonitoredItemGroup.create(sub, items, { samplingInterval: 0, discardOldest: true, queueSize: o.queueSize },
                                                    TimestampsToReturn.Both);
      await new Promise((resolve, reject) => { group.once("initialized", resolve); group.once("err", reject); });
    }
  }
  const subscribeS = (Date.now() - t0) / 1000;
  await sleep(o.warmupS * 1000);
  recording = true;
  writeStdout(JSON.stringify({ recording: true }) + "\n");  // the benchmark brackets its CPU figure with this
  const w0 = Date.now();
  await sleep(o.windowS * 1000);
  recording = false;
  const windowS = (Date.now() - w0) / 1000;
  latencies.sort((a, b) => a - b);
  const q = (p) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] / 1000 : null);
  const result = { ok: true, items: spec.ids.length, subscribe_s: subscribeS, count, window_s: windowS,
                   updates_per_s: count / windowS, latency_p50_s: q(0.5), latency_p99_s: q(0.99) };
  try {
    for (const sub of subs) await sub.terminate();
    await session.close();
    await client.disconnect();
  } catch (e) { /* the figures are taken */ }
  writeStdout(JSON.stringify(result) + "\n");
  process.exit(0);
}

main().catch((e) => { writeStdout(JSON.stringify({ ok: false, error: String(e && e.message || e) }) + "\n"); process.exit(1); });
