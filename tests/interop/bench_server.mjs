#!/usr/bin/env node
// The node-opcua side of the stress case of `cmcs bench gateway` (bench/stress.py): a node-opcua
// server publishing as many variables as the gateway, every one changing every scan.
//
//   node bench_server.mjs --port P --vars FILE --scan-s 0.5
//
// FILE: {"namespace": URI, "vars": [[string identifier, "Double"|"Int32"|"Boolean"], ...]}: the
// gateway's own variables and types. As the gateway's driver staggers its devices over the scan
// period, the variables are updated in SLICES groups spread evenly over the period; each update
// alternates the value (10 <-> 20, 1 <-> 2, false <-> true) with setValueFromSource and the time
// of the update as SourceTimestamp. Security None, anonymous (the benchmark's loopback endpoint).
// Prints {"ready": true, "variables": n} on stdout when listening; stops on SIGTERM.

import fs from "node:fs";
// node-opcua-server exports the server; the common types come with the client package (same version)
import { DataType, MessageSecurityMode, SecurityPolicy, StatusCodes } from "node-opcua-client";
import opcua from "node-opcua-server";

const { OPCUAServer } = opcua;

for (const k of ["log", "info", "warn", "debug", "trace"]) {
  console[k] = (...a) => process.stderr.write(a.map(String).join(" ") + "\n");
}

const SLICES = 20;

function args(argv) {
  const o = { scanS: 1.0 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--port") o.port = Number(argv[++i]);
    else if (argv[i] === "--vars") o.vars = argv[++i];
    else if (argv[i] === "--scan-s") o.scanS = Number(argv[++i]);
  }
  return o;
}

async function main() {
  const o = args(process.argv.slice(2));
  const spec = JSON.parse(fs.readFileSync(o.vars, "utf8"));
  const server = new OPCUAServer({
    port: o.port, hostname: "127.0.0.1", resourcePath: "/cmcs", allowAnonymous: true,
    securityModes: [MessageSecurityMode.None], securityPolicies: [SecurityPolicy.None],
    maxConnectionsPerEndpoint: 10,
    serverCapabilities: { maxMonitoredItems: 1000000, maxMonitoredItemsPerSubscription: 1000000, maxSubscriptionsPerSession: 100,
                          maxSubscriptions: 200 },
  });
  await server.initialize();
  const addressSpace = server.engine.addressSpace;
  const namespace = addressSpace.registerNamespace(spec.namespace);
  const folder = namespace.addFolder(addressSpace.rootFolder.objects, { browseName: "Bench" });
  const types = { Double: DataType.Double, Int32: DataType.Int32, Boolean: DataType.Boolean };
  const phases = { Double: [10.0, 20.0], Int32: [1, 2], Boolean: [false, true] };
  const vars = spec.vars.map(([id, type]) => {
    const v = namespace.addVariable({
      componentOf: folder, browseName: id, nodeId: `s=${id}`, dataType: type,
      value: { dataType: types[type], value: phases[type][0] },
    });
    return { v, type, phase: 0 };
  });
  await server.start();
  process.stdout.write(JSON.stringify({ ready: true, variables: vars.length }) + "\n");
  const slice = Math.ceil(vars.length / SLICES);
  let k = 0;
  const timer = setInterval(() => {
    const now = new Date();
    const start = (k % SLICES) * slice;
    for (let i = start; i < Math.min(vars.length, start + slice); i++) {
      const e = vars[i];
      e.phase = 1 - e.phase;
      e.v.setValueFromSource({ dataType: types[e.type], value: phases[e.type][e.phase] }, StatusCodes.Good, now);
    }
    k++;
  }, (o.scanS * 1000) / SLICES);
  const stop = async () => { clearInterval(timer); await server.shutdown(0); process.exit(0); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + "\n"); process.exit(1); });
