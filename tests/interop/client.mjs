#!/usr/bin/env node
// An OPC UA client that is not ours (node-opcua) against the cmcs-gateway server.
//
//   node client.mjs ENDPOINT_URL [--security-mode None|Sign|SignAndEncrypt]
//        [--security-policy None|Basic256Sha256|Aes128_Sha256_RsaOaep|Aes256_Sha256_RsaPss]
//        [--user NAME [--password PW]] [--pki-dir DIR] [--subscribe-seconds 5] [--timeout 60]
//        [--no-switch] [--user-certificate FILE --user-key FILE] [--server-certificate FILE]
//        [--ops JSON]
//   node client.mjs --make-certificate --pki-dir DIR
//
// It uses no knowledge of the gateway's NodeId naming: it resolves the types namespace from the
// server's NamespaceArray, browses from the Objects folder following hierarchical references,
// finds the MicroAtsType instances through their HasTypeDefinition reference, reads LoadPower
// (value, EngineeringUnits, EURange) and ActiveSource (value, DataType), subscribes to LoadPower,
// then calls SwitchSource twice on one unit on SourceA (the second call falls in the dwell time).
//
// Security: --user/--password log in with a UserName token, --user-certificate/--user-key (PEM or
// DER certificate, PEM key) with an X509 token; otherwise Anonymous. The client's own application
// certificate lives under --pki-dir (created on first use; --make-certificate only creates it and
// prints its file and thumbprint, for the server's trust list). --server-certificate trusts exactly
// that server certificate and refuses any other (without it, node-opcua accepts an unknown one).
//
// result.endpoints lists what GetEndpoints returned (security mode, policy, user token types).
//
// --ops JSON replaces the browse/subscribe/switch walk by a list of operations, each answered in
// result.ops: {"op":"read","ns":URI,"id":S,"attribute":"Value|UserAccessLevel|UserExecutable|
// AccessLevel|Executable"}, {"op":"write","ns":URI,"id":S,"dataType":"Double","value":V},
// {"op":"call","ns":URI,"object":S,"method":S,"args":[{"dataType":"Int32","value":V}]}
// (ns/id: namespace URI and string identifier; the URI is resolved through the NamespaceArray).
//
// Prints exactly one JSON object on stdout ({"ok": true, ...} or {"ok": false, "error": ...});
// node-opcua's own log lines go to stderr. Exit code 0 on success, 1 on failure, 2 on timeout.
// The password may also come from the environment variable CMCS_INTEROP_PASSWORD.

// node-opcua logs through console.log: keep stdout for the one JSON result.
const writeStdout = process.stdout.write.bind(process.stdout);
for (const k of ["log", "info", "warn", "debug", "trace"]) {
  console[k] = (...a) => process.stderr.write(a.map(String).join(" ") + "\n");
}

const TYPES_URI = "urn:cmcs-gateway:UA:PowerDistribution";
const USAGE = "usage: node client.mjs ENDPOINT_URL [--security-mode M] [--security-policy P] " +
  "[--user NAME] [--password PW] [--pki-dir DIR] [--subscribe-seconds S] [--timeout S] [--no-switch] " +
  "[--user-certificate FILE --user-key FILE] [--server-certificate FILE] [--ops JSON] | --make-certificate --pki-dir DIR";

function parseArgs(argv) {
  const opts = {
    endpoint: null, securityMode: "None", securityPolicy: "None", user: null,
    password: process.env.CMCS_INTEROP_PASSWORD ?? null, pkiDir: null,
    subscribeSeconds: 5, timeout: 60, doSwitch: true, userCertificate: null, userKey: null,
    serverCertificate: null, ops: null, makeCertificate: false,
  };
  const valued = {
    "--security-mode": "securityMode", "--security-policy": "securityPolicy", "--user": "user",
    "--password": "password", "--pki-dir": "pkiDir", "--subscribe-seconds": "subscribeSeconds",
    "--timeout": "timeout", "--user-certificate": "userCertificate", "--user-key": "userKey",
    "--server-certificate": "serverCertificate", "--ops": "ops",
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--no-switch") opts.doSwitch = false;
    else if (a === "--make-certificate") opts.makeCertificate = true;
    else if (a === "-h" || a === "--help") { process.stderr.write(USAGE + "\n"); process.exit(0); }
    else if (a in valued) {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      opts[valued[a]] = argv[++i];
    } else if (a.startsWith("--")) throw new Error(`unknown option ${a}`);
    else if (opts.endpoint === null) opts.endpoint = a;
    else throw new Error(`unexpected argument ${a}`);
  }
  if (!opts.endpoint && !opts.makeCertificate) throw new Error("missing ENDPOINT_URL");
  if (opts.makeCertificate && !opts.pkiDir) throw new Error("--make-certificate needs --pki-dir");
  if (!!opts.userCertificate !== !!opts.userKey) throw new Error("--user-certificate and --user-key go together");
  if (opts.ops !== null) {
    opts.ops = JSON.parse(opts.ops);
    if (!Array.isArray(opts.ops)) throw new Error("--ops must be a JSON list");
  }
  opts.subscribeSeconds = Number(opts.subscribeSeconds);
  opts.timeout = Number(opts.timeout);
  if (!(opts.subscribeSeconds >= 0) || !(opts.timeout > 0)) throw new Error("bad number");
  return opts;
}

let result = { ok: false, stage: "start" };
let printed = false;
function emit(obj, code) {
  if (!printed) {
    printed = true;
    writeStdout(JSON.stringify(obj) + "\n");
  }
  process.exitCode = code;
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (err) {
  emit({ ok: false, stage: "arguments", error: `${err.message}; ${USAGE}` }, 1);
  process.exit(1);
}
// node-opcua keeps its PKI (the client's own certificate) under $XDG_CONFIG_HOME/node-opcua-default*/
if (opts.pkiDir) process.env.XDG_CONFIG_HOME = opts.pkiDir;

const timer = setTimeout(() => {
  emit({ ...result, ok: false, error: `overall timeout of ${opts.timeout} s at stage '${result.stage}'` }, 2);
  process.exit(2);
}, opts.timeout * 1000);

const ua = await import("node-opcua-client");
const {
  OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, BrowseDirection, NodeClass,
  StatusCodes, DataType, TimestampsToReturn, ClientMonitoredItemGroup, UserTokenType, resolveNodeId,
  crypto_utils,
} = ua;
const fs = await import("node:fs");

const FORWARD = BrowseDirection.Forward;
const ALL_RESULTS = 0x3f;
const id = (s) => resolveNodeId(s);
const HIERARCHICAL = id("i=33"), HAS_TYPE_DEFINITION = id("i=40"), HAS_SUBTYPE = id("i=45");
const HAS_PROPERTY = id("i=46"), OBJECTS_FOLDER = id("i=85"), BASE_OBJECT_TYPE = id("i=58");
const ENUMERATION = id("i=29"), SERVER_NAMESPACE_ARRAY = id("i=2255");
const key = (nodeId) => nodeId.toString();
const sc = (statusCode) => statusCode.name;

let namespaces = [];
const nsUri = (nodeId) => namespaces[nodeId.namespace] ?? null;
const qn = (q) => ({ namespaceUri: namespaces[q.namespaceIndex] ?? null, name: q.name });

function jsonable(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === "bigint") return Number(v);
  if (Array.isArray(v) || ArrayBuffer.isView(v)) return Array.from(v, jsonable);
  if (v.text !== undefined && v.locale !== undefined) return v.text;  // LocalizedText
  if (typeof v.toJSON === "function") return v.toJSON();
  return v;
}

async function browseMany(session, descriptions) {
  // browse, then follow continuation points: a complete reference list per description
  const out = [];
  const CHUNK = 500;
  for (let i = 0; i < descriptions.length; i += CHUNK) {
    const part = descriptions.slice(i, i + CHUNK);
    const results = await session.browse(part);
    for (let j = 0; j < results.length; j++) {
      let r = results[j];
      if (!r.statusCode.isGood()) throw new Error(`Browse ${key(part[j].nodeId)}: ${sc(r.statusCode)}`);
      const refs = [...(r.references ?? [])];
      while (r.continuationPoint && r.continuationPoint.length) {
        r = await session.browseNext(r.continuationPoint, false);
        if (!r.statusCode.isGood()) throw new Error(`BrowseNext ${key(part[j].nodeId)}: ${sc(r.statusCode)}`);
        refs.push(...(r.references ?? []));
      }
      out.push(refs);
    }
  }
  return out;
}

const browseDesc = (nodeId, referenceTypeId, direction = FORWARD, includeSubtypes = true) => ({
  nodeId, referenceTypeId, browseDirection: direction, includeSubtypes, nodeClassMask: 0, resultMask: ALL_RESULTS,
});

async function readMany(session, items) {
  const out = [];
  for (let i = 0; i < items.length; i += 1000) out.push(...(await session.read(items.slice(i, i + 1000))));
  return out;
}

function child(tree, nodeId, nsIndex, name, nodeClass = null) {
  const refs = tree.get(key(nodeId))?.refs ?? [];
  return refs.find((r) => r.browseName.namespaceIndex === nsIndex && r.browseName.name === name &&
    (nodeClass === null || r.nodeClass === nodeClass)) ?? null;
}

// The built-in type (DataType enum value, 1..25) a value of `dataType` is encoded as, following the
// DataType's supertypes: an enumeration is an Int32, a structure an ExtensionObject.
async function builtinTypesOf(session, dataTypeIds) {
  const parent = new Map();
  let todo = [...new Set(dataTypeIds.map(key))].map(id);
  while (todo.length) {
    todo = todo.filter((n) => !parent.has(key(n)) && !(n.namespace === 0 && n.value <= 29));
    if (!todo.length) break;
    const sup = await browseMany(session, todo.map((n) => browseDesc(n, HAS_SUBTYPE, BrowseDirection.Inverse, false)));
    const next = [];
    todo.forEach((n, i) => {
      parent.set(key(n), sup[i][0]?.nodeId ?? null);
      if (sup[i][0]) next.push(sup[i][0].nodeId);
    });
    todo = next;
  }
  const builtin = (n) => {
    for (let cur = n, hops = 0; cur && hops < 50; cur = parent.get(key(cur)), hops++) {
      if (cur.namespace === 0 && [24, 26, 27, 28].includes(cur.value)) return null;  // abstract: any
      if (cur.namespace === 0 && cur.value === 29) return DataType.Int32;
      if (cur.namespace === 0 && cur.value === 22) return DataType.ExtensionObject;
      if (cur.namespace === 0 && cur.value <= 25) return cur.value;
    }
    return null;
  };
  return new Map(dataTypeIds.map((n) => [key(n), builtin(n)]));
}

async function sweepVariables(session, tree) {
  const vars = [...tree.values()].filter((n) => n.nodeClass === NodeClass.Variable && n.nodeId.namespace !== 0);
  const attrs = [AttributeIds.Value, AttributeIds.DataType, AttributeIds.Description, AttributeIds.ValueRank];
  const dvs = await readMany(session, vars.flatMap((v) => attrs.map((a) => ({ nodeId: v.nodeId, attributeId: a }))));
  const types = vars.map((_, i) => dvs[i * 4 + 1].value.value);
  const builtin = await builtinTypesOf(session, types.filter(Boolean));
  const problems = [];
  const problem = (v, attribute, issue) => problems.push({ nodeId: key(v.nodeId), namespaceUri: nsUri(v.nodeId), path: v.path, attribute, issue });
  let analog = 0;
  vars.forEach((v, i) => {
    const [value, dataType, description, valueRank] = dvs.slice(i * 4, i * 4 + 4);
    if (!dataType.statusCode.isGood() || !dataType.value.value) return problem(v, "DataType", sc(dataType.statusCode));
    const dt = dataType.value.value;
    if (dt.namespace === 0 && dt.value === 24) problem(v, "DataType", "BaseDataType (no explicit DataType)");
    if (!description.statusCode.isGood() || !description.value.value?.text) problem(v, "Description", "missing or empty");
    const want = builtin.get(key(dt));
    const got = value.value?.dataType;
    if (value.statusCode.isGood() && want !== null && got !== DataType.Null && got !== want) {
      problem(v, "Value", `encoded as ${DataType[got]} but DataType ${key(dt)} needs ${DataType[want]}`);
    }
    const rank = valueRank.value.value;
    const isArray = value.value?.arrayType !== undefined && value.value.arrayType !== 0;
    if (value.statusCode.isGood() && got !== DataType.Null && rank === -1 && isArray) problem(v, "Value", "array value, ValueRank Scalar");
    if (key(v.typeDefinition ?? id("i=0")) === "ns=0;i=2368") {
      analog += 1;
      const props = new Set((v.refs ?? []).filter((r) => r.browseName.namespaceIndex === 0).map((r) => r.browseName.name));
      for (const p of ["EngineeringUnits", "EURange"]) if (!props.has(p)) problem(v, p, "AnalogItemType without it");
    }
  });
  const byNamespace = {};
  for (const p of problems) byNamespace[p.namespaceUri] = (byNamespace[p.namespaceUri] ?? 0) + 1;
  return { checked: vars.length, analogItems: analog, problemCount: problems.length, problemsByNamespace: byNamespace,
    problems: problems.slice(0, 40) };
}

async function main(session) {
  // ---- namespaces ----------------------------------------------------------------------------
  result.stage = "namespaces";
  const nsDv = await session.read({ nodeId: SERVER_NAMESPACE_ARRAY, attributeId: AttributeIds.Value });
  namespaces = nsDv.value.value;
  const typesNs = namespaces.indexOf(TYPES_URI);
  if (typesNs < 0) throw new Error(`types namespace ${TYPES_URI} not in NamespaceArray ${JSON.stringify(namespaces)}`);
  result.namespaceArray = namespaces;
  result.typesNamespaceIndex = typesNs;

  // ---- the MicroAtsType ObjectType and its subtypes, from BaseObjectType by HasSubtype -------------
  result.stage = "type hierarchy";
  const subtypesOf = new Map();  // type -> direct subtypes (ReferenceDescriptions)
  let frontier = [BASE_OBJECT_TYPE];
  let microAtsType = null;
  while (frontier.length) {
    const refsList = await browseMany(session, frontier.map((n) => browseDesc(n, HAS_SUBTYPE, FORWARD, false)));
    const next = [];
    refsList.forEach((refs, i) => {
      subtypesOf.set(key(frontier[i]), refs);
      for (const r of refs) {
        if (r.browseName.namespaceIndex === typesNs && r.browseName.name === "MicroAtsType") microAtsType = r.nodeId;
        next.push(r.nodeId);
      }
    });
    frontier = next;
  }
  if (!microAtsType) throw new Error("no ObjectType MicroAtsType in the types namespace below BaseObjectType");
  const microAtsTypes = new Set([key(microAtsType)]);
  for (let todo = [microAtsType]; todo.length;) {
    const t = todo.pop();
    for (const r of subtypesOf.get(key(t)) ?? []) { microAtsTypes.add(key(r.nodeId)); todo.push(r.nodeId); }
  }
  result.microAtsType = { nodeId: key(microAtsType), namespaceUri: nsUri(microAtsType), subtypes: microAtsTypes.size - 1 };

  // ---- the instance tree, from Objects, by hierarchical references -------------------------------
  result.stage = "browse";
  const t0 = Date.now();
  const tree = new Map([[key(OBJECTS_FOLDER), { nodeId: OBJECTS_FOLDER, nodeClass: NodeClass.Object, path: "Objects", refs: null }]]);
  frontier = [OBJECTS_FOLDER];
  let depth = 0;
  while (frontier.length) {
    const refsList = await browseMany(session, frontier.map((n) => browseDesc(n, HIERARCHICAL)));
    const next = [];
    refsList.forEach((refs, i) => {
      const parent = tree.get(key(frontier[i]));
      parent.refs = refs;
      for (const r of refs) {
        const k = key(r.nodeId);
        if (tree.has(k) || r.nodeId.serverIndex) continue;
        tree.set(k, { nodeId: r.nodeId, nodeClass: r.nodeClass, typeDefinition: r.typeDefinition,
          path: `${parent.path}/${r.browseName.name}`, refs: [] });
        // methods have only their argument properties below them; everything else is followed
        if (r.nodeClass === NodeClass.Object || r.nodeClass === NodeClass.Variable) next.push(r.nodeId);
      }
    });
    frontier = next;
    depth += 1;
    if (tree.size > 500000) throw new Error("address space larger than 500,000 nodes");
  }
  const objects = [...tree.values()].filter((n) => n.nodeClass === NodeClass.Object);
  result.browse = { nodes: tree.size, objects: objects.length, depth, ms: Date.now() - t0 };

  // ---- instances of MicroAtsType: each object's HasTypeDefinition ------------------------------------
  result.stage = "type definitions";
  const typeRefs = await browseMany(session, objects.map((o) => browseDesc(o.nodeId, HAS_TYPE_DEFINITION, FORWARD, false)));
  const instances = [];
  const typeDefMismatch = [];
  typeRefs.forEach((refs, i) => {
    if (refs.length !== 1) typeDefMismatch.push({ nodeId: key(objects[i].nodeId), typeDefinitions: refs.length });
    if (refs.some((r) => microAtsTypes.has(key(r.nodeId)))) instances.push({ ...objects[i], typeDefinition: refs[0].nodeId });
  });
  result.objectsWithoutOneTypeDefinition = typeDefMismatch;

  // ---- LoadPower (value, EngineeringUnits, EURange) and ActiveSource (value, DataType) ------------
  result.stage = "read";
  const reads = [];
  const plan = instances.map((inst) => {
    const lp = child(tree, inst.nodeId, typesNs, "LoadPower", NodeClass.Variable);
    const as = child(tree, inst.nodeId, typesNs, "ActiveSource", NodeClass.Variable);
    if (!lp || !as) throw new Error(`${inst.path}: no LoadPower/ActiveSource component (${!!lp}/${!!as})`);
    const eu = child(tree, lp.nodeId, 0, "EngineeringUnits");
    const range = child(tree, lp.nodeId, 0, "EURange");
    const at = (nodeId, attributeId) => { reads.push({ nodeId, attributeId }); return reads.length - 1; };
    return {
      inst, lp, as, eu, range,
      lpValue: at(lp.nodeId, AttributeIds.Value), lpType: at(lp.nodeId, AttributeIds.DataType),
      euValue: eu ? at(eu.nodeId, AttributeIds.Value) : null,
      rangeValue: range ? at(range.nodeId, AttributeIds.Value) : null,
      asValue: at(as.nodeId, AttributeIds.Value), asType: at(as.nodeId, AttributeIds.DataType),
    };
  });
  const dvs = await readMany(session, reads);
  const dataTypes = new Map();
  const units = plan.map((p) => {
    const dv = (i) => (i === null ? null : dvs[i]);
    const euv = dv(p.euValue)?.value?.value ?? null;
    const rng = dv(p.rangeValue)?.value?.value ?? null;
    const lpType = dv(p.lpType).value.value, asType = dv(p.asType).value.value;
    dataTypes.set(key(lpType), lpType);
    dataTypes.set(key(asType), asType);
    return {
      nodeId: key(p.inst.nodeId),
      path: p.inst.path,
      typeDefinition: key(p.inst.typeDefinition),
      loadPower: {
        nodeId: key(p.lp.nodeId),
        typeDefinition: key(p.lp.typeDefinition),
        value: jsonable(dv(p.lpValue).value.value),
        statusCode: sc(dv(p.lpValue).statusCode),
        dataType: key(lpType),
        engineeringUnits: euv && {
          namespaceUri: euv.namespaceUri, unitId: euv.unitId,
          displayName: euv.displayName?.text ?? null, description: euv.description?.text ?? null,
        },
        euRange: rng && { low: rng.low, high: rng.high },
        engineeringUnitsStatus: p.eu ? sc(dv(p.euValue).statusCode) : "missing",
        euRangeStatus: p.range ? sc(dv(p.rangeValue).statusCode) : "missing",
      },
      activeSource: {
        nodeId: key(p.as.nodeId),
        value: jsonable(dv(p.asValue).value.value),
        variantType: DataType[dv(p.asValue).value.dataType],
        statusCode: sc(dv(p.asValue).statusCode),
        dataType: key(asType),
      },
      _switch: child(tree, p.inst.nodeId, typesNs, "SwitchSource", NodeClass.Method),
      _inst: p.inst, _lp: p.lp, _as: p.as,
    };
  });

  // ---- the DataTypes met: BrowseName, namespace, supertype, EnumStrings / EnumValues --------------
  result.stage = "data types";
  const dtList = [...dataTypes.values()];
  const dtNames = await readMany(session, dtList.map((n) => ({ nodeId: n, attributeId: AttributeIds.BrowseName })));
  const dtSuper = await browseMany(session, dtList.map((n) => browseDesc(n, HAS_SUBTYPE, BrowseDirection.Inverse, false)));
  const dtProps = await browseMany(session, dtList.map((n) => browseDesc(n, HAS_PROPERTY, FORWARD, false)));
  const enumReads = [];
  dtProps.forEach((refs, i) => {
    for (const r of refs) {
      if (r.browseName.namespaceIndex === 0 && ["EnumStrings", "EnumValues"].includes(r.browseName.name)) {
        enumReads.push({ i, name: r.browseName.name, nodeId: r.nodeId });
      }
    }
  });
  const enumDvs = await readMany(session, enumReads.map((e) => ({ nodeId: e.nodeId, attributeId: AttributeIds.Value })));
  result.dataTypes = {};
  dtList.forEach((n, i) => {
    const info = {
      browseName: qn(dtNames[i].value.value), namespaceUri: nsUri(n),
      supertype: dtSuper[i].map((r) => key(r.nodeId)),
      isEnumeration: dtSuper[i].some((r) => key(r.nodeId) === key(ENUMERATION)),
    };
    enumReads.forEach((e, j) => {
      if (e.i !== i) return;
      const v = enumDvs[j].value.value;
      info[e.name === "EnumStrings" ? "enumStrings" : "enumValues"] = e.name === "EnumStrings"
        ? Array.from(v ?? [], (t) => t.text)
        : Array.from(v ?? [], (ev) => ({ value: Number(ev.value), name: ev.displayName?.text ?? null }));
    });
    result.dataTypes[key(n)] = info;
  });
  result.microAtsInstances = units.length;
  result.units = units.map(({ _switch, _inst, _lp, _as, ...u }) => u);

  // ---- every instance variable outside namespace 0: DataType, Description, value encoding, units --------
  result.stage = "variable sweep";
  result.variables = await sweepVariables(session, tree);

  // ---- subscription on every LoadPower ----------------------------------------------------------
  result.stage = "subscription";
  const seconds = opts.subscribeSeconds;
  const subscription = await session.createSubscription2({
    requestedPublishingInterval: 200, requestedLifetimeCount: 100, requestedMaxKeepAliveCount: 10,
    maxNotificationsPerPublish: 0, publishingEnabled: true, priority: 1,
  });
  const perItem = units.map(() => ({ notifications: 0, values: new Set(), bad: 0 }));
  const group = ClientMonitoredItemGroup.create(
    subscription,
    units.map((u) => ({ nodeId: u._lp.nodeId, attributeId: AttributeIds.Value })),
    { samplingInterval: 200, discardOldest: true, queueSize: 10 },
    TimestampsToReturn.Both,
  );
  group.on("changed", (_item, dataValue, index) => {
    const s = perItem[index];
    s.notifications += 1;
    if (dataValue.statusCode.isGood()) s.values.add(dataValue.value.value);
    else s.bad += 1;
  });
  await new Promise((resolve, reject) => {
    group.once("initialized", resolve);
    group.once("err", (e) => reject(new Error(`monitored items: ${e}`)));
  });
  const itemStatus = group.monitoredItems.map((m) => sc(m.statusCode));
  await new Promise((r) => setTimeout(r, seconds * 1000));
  await group.terminate();
  await subscription.terminate();
  result.subscription = {
    seconds, revisedPublishingInterval: subscription.publishingInterval, monitoredItems: units.length,
    monitoredItemStatus: [...new Set(itemStatus)],
    notifications: perItem.reduce((a, s) => a + s.notifications, 0),
    distinctValues: perItem.reduce((a, s) => a + s.values.size, 0),
    itemsWithChangingValues: perItem.filter((s) => s.values.size >= 2).length,
    badNotifications: perItem.reduce((a, s) => a + s.bad, 0),
  };

  // ---- SwitchSource on a unit on SourceA, then again inside the dwell time ----------------------------
  if (!opts.doSwitch) return;
  result.stage = "switch";
  const unit = units.find((u) => u.activeSource.value === 1 && u.activeSource.statusCode === "Good" && u._switch);
  if (!unit) throw new Error("no MicroAtsType instance with ActiveSource = 1 (SourceA) and a SwitchSource method");
  const method = unit._switch.nodeId;
  const argRefs = (await browseMany(session, [browseDesc(method, HAS_PROPERTY, FORWARD, false)]))[0];
  const argNodes = ["InputArguments", "OutputArguments"].map(
    (n) => argRefs.find((r) => r.browseName.namespaceIndex === 0 && r.browseName.name === n) ?? null);
  const argDvs = await readMany(session, argNodes.filter(Boolean).map((r) => ({ nodeId: r.nodeId, attributeId: AttributeIds.Value })));
  const describe = (v) => Array.from(v ?? [], (a) => ({ name: a.name, dataType: key(a.dataType), valueRank: a.valueRank }));
  const sw = {
    unit: unit.path, object: unit.nodeId, method: key(method),
    inputArguments: argNodes[0] ? describe(argDvs[0].value.value) : null,
    outputArguments: argNodes[1] ? describe(argDvs[argNodes[0] ? 1 : 0].value.value) : null,
  };
  result.switch = sw;
  const readActive = async () => jsonable((await session.read({ nodeId: unit._as.nodeId, attributeId: AttributeIds.Value })).value.value);
  const call = async (target) => {
    const t = process.hrtime.bigint();
    const r = await session.call({ objectId: unit._inst.nodeId, methodId: method,
      inputArguments: [{ dataType: DataType.Int32, value: target }] });
    return {
      target, statusCode: sc(r.statusCode),
      inputArgumentResults: (r.inputArgumentResults ?? []).map(sc),
      outputArguments: (r.outputArguments ?? []).map((v) => ({ dataType: DataType[v.dataType], value: jsonable(v.value) })),
      roundTripMs: Number(process.hrtime.bigint() - t) / 1e6,
    };
  };
  sw.activeSourceBefore = await readActive();
  sw.first = await call(2);
  sw.first.transferTimeMs = sw.first.outputArguments[0]?.value ?? null;
  sw.activeSourceAfter = await readActive();
  sw.second = await call(1);
  sw.activeSourceAfterSecond = await readActive();
}

// PEM or DER file -> DER Buffer
function readDer(file) {
  const data = fs.readFileSync(file);
  return data.toString("latin1").includes("-----BEGIN") ? crypto_utils.convertPEMtoDER(data.toString("utf8")) : data;
}

async function runOps(session, ops) {
  result.stage = "ops";
  const nsDv = await session.read({ nodeId: SERVER_NAMESPACE_ARRAY, attributeId: AttributeIds.Value });
  namespaces = nsDv.value.value;
  const nodeOf = (nsUriValue, identifier) => {
    const index = namespaces.indexOf(nsUriValue);
    if (index < 0) throw new Error(`namespace ${nsUriValue} not in NamespaceArray`);
    return resolveNodeId(`ns=${index};s=${identifier}`);
  };
  result.ops = [];
  for (const op of ops) {
    const out = { ...op };
    try {
      if (op.op === "read") {
        const dv = await session.read({ nodeId: nodeOf(op.ns, op.id), attributeId: AttributeIds[op.attribute ?? "Value"] });
        out.statusCode = sc(dv.statusCode);
        out.value = jsonable(dv.value?.value);
        out.dataType = dv.value ? DataType[dv.value.dataType] : null;
      } else if (op.op === "write") {
        const status = await session.write({ nodeId: nodeOf(op.ns, op.id), attributeId: AttributeIds.Value,
          value: { value: { dataType: DataType[op.dataType], value: op.value } } });
        out.statusCode = sc(status);
      } else if (op.op === "call") {
        const r = await session.call({ objectId: nodeOf(op.ns, op.object), methodId: nodeOf(op.ns, op.method),
          inputArguments: (op.args ?? []).map((a) => ({ dataType: DataType[a.dataType], value: a.value })) });
        out.statusCode = sc(r.statusCode);
        out.outputArguments = (r.outputArguments ?? []).map((v) => jsonable(v.value));
      } else {
        throw new Error(`unknown op ${op.op}`);
      }
    } catch (err) {
      // a service fault (the whole request refused) surfaces as an exception in node-opcua
      out.statusCode = err?.response?.responseHeader?.serviceResult?.name ?? null;
      out.error = String(err?.message ?? err);
    }
    result.ops.push(out);
  }
}

async function makeCertificate() {
  result.stage = "certificate";
  const client = OPCUAClient.create({ applicationName: "cmcs-interop-node-opcua" });
  await client.clientCertificateManager.initialize();
  await client.createDefaultCertificate();
  const certDer = readDer(client.certificateFile);
  result.certificateFile = client.certificateFile;
  result.thumbprint = crypto_utils.makeSHA1Thumbprint(certDer).toString("hex");
  result.ok = true;
}

async function run() {
  result.stage = "arguments";
  const securityMode = MessageSecurityMode[opts.securityMode];
  const securityPolicy = SecurityPolicy[opts.securityPolicy];
  if (securityMode === undefined || typeof securityMode !== "number") throw new Error(`unknown security mode ${opts.securityMode}`);
  if (securityPolicy === undefined) throw new Error(`unknown security policy ${opts.securityPolicy}`);
  result.endpoint = opts.endpoint;
  result.securityMode = opts.securityMode;
  result.securityPolicy = opts.securityPolicy;
  const client = OPCUAClient.create({
    applicationName: "cmcs-interop-node-opcua",
    securityMode, securityPolicy,
    endpointMustExist: true,
    connectionStrategy: { maxRetry: 2, initialDelay: 500, maxDelay: 2000 },
    requestedSessionTimeout: 60000,
    keepSessionAlive: true,
  });
  if (opts.serverCertificate) {
    // trust this server certificate only: an unknown or altered one fails the connection
    const cm = client.clientCertificateManager;
    await cm.initialize();
    cm.automaticallyAcceptUnknownCertificate = false;
    await cm.trustCertificate(readDer(opts.serverCertificate));
    result.serverCertificateTrusted = crypto_utils.makeSHA1Thumbprint(readDer(opts.serverCertificate)).toString("hex");
  }
  let session = null;
  try {
    result.stage = "connect";
    await client.connect(opts.endpoint);
    result.stage = "endpoints";
    result.endpoints = (await client.getEndpoints()).map((e) => ({
      securityMode: MessageSecurityMode[e.securityMode],
      securityPolicy: e.securityPolicyUri?.split("#")[1] ?? null,
      userTokens: (e.userIdentityTokens ?? []).map((t) => UserTokenType[t.tokenType]),
    }));
    result.stage = "session";
    let identity = { type: UserTokenType.Anonymous };
    if (opts.user) identity = { type: UserTokenType.UserName, userName: opts.user, password: opts.password ?? "" };
    else if (opts.userCertificate) {
      identity = { type: UserTokenType.Certificate, certificateData: readDer(opts.userCertificate),
        privateKey: fs.readFileSync(opts.userKey, "utf8") };
    }
    result.identity = UserTokenType[identity.type];
    session = await client.createSession(identity);
    result.stage = "session created";
    if (opts.ops !== null) await runOps(session, opts.ops);
    else await main(session);
    result.stage = "done";
    result.ok = true;
  } finally {
    try { if (session) await session.close(true); } catch (e) { result.closeError = String(e?.message ?? e); }
    try { await client.disconnect(); } catch (e) { result.disconnectError = String(e?.message ?? e); }
  }
}

try {
  if (opts.makeCertificate) await makeCertificate();
  else await run();
  clearTimeout(timer);
  emit(result, 0);
} catch (err) {
  clearTimeout(timer);
  emit({ ...result, ok: false, error: String(err?.message ?? err) }, 1);
}
// node-opcua may leave timers behind after disconnect: do not wait for them
setTimeout(() => process.exit(process.exitCode ?? 0), 200).unref();
