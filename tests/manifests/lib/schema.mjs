// Schema validation with the npm models, unknown fields rejected.
//
// The models (@kubernetes-models/*) ship ajv validators compiled from the
// CRDs with every `x-kubernetes-*` key removed and no `additionalProperties:
// false`, so they accept any unknown field. The compiled validator reads
// every property its schema declares (`data.mode !== undefined && …`), and
// enumerates the keys of a map (`for (const k in data)`); it touches an
// object whose schema declares nothing (a field the CRD marks
// x-kubernetes-preserve-unknown-fields, like WasmPlugin pluginConfig) only to
// check that it is an object. So the validator is run on a proxy of the
// document that records what it reads: in an object the validator read
// properties of, a key it never asked for is a field the schema does not
// have. Maps and free-form objects are left alone, as the API server does.
// tests/manifests/bad/ holds the cases that keep this honest.

const MODULES = [
  { pkg: "@kubernetes-models/istio", label: "@kubernetes-models/istio@3.0.1 (Istio 1.29.2)" },
  { pkg: "@kubernetes-models/envoy-gateway", label: "@kubernetes-models/envoy-gateway@2.0.0 (Envoy Gateway v1.7.3)" },
  { pkg: "@kubernetes-models/gateway-api", label: "@kubernetes-models/gateway-api@2.0.0 (Gateway API v1.5.1)" },
  { pkg: "kubernetes-models", label: "kubernetes-models@5.1.0" },
];
export const ISTIO_118 = { pkg: "istio-1.18", label: "@kubernetes-models/istio@2.3.0 (Istio 1.18.0)" };

const cache = new Map();

// The model class for apiVersion/kind in one of `modules`, or null.
export async function findModel(apiVersion, kind, modules = MODULES) {
  const key = `${modules.map((m) => m.pkg).join(",")}|${apiVersion}|${kind}`;
  if (cache.has(key)) return cache.get(key);
  let found = null;
  if (/^[a-z0-9.-]*\/?v[0-9a-z]+$/.test(apiVersion) && /^[A-Za-z0-9]+$/.test(kind)) {
    for (const m of modules) {
      let mod;
      try {
        mod = await import(`${m.pkg}/${apiVersion}`);
      } catch {
        continue;
      }
      const M = mod[kind];
      if (M && M.apiVersion === apiVersion && M.kind === kind && typeof M.prototype?.validate === "function") {
        found = { Model: M, label: m.label };
        break;
      }
    }
  }
  cache.set(key, found);
  return found;
}

export function pathText(segments) {
  return segments.map((s, i) => (typeof s === "number" ? `[${s}]` : i === 0 ? s : `.${s}`)).join("");
}

function instancePathToSegments(p) {
  if (!p) return [];
  return p.split("/").slice(1).map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~")).map((s) => (/^\d+$/.test(s) ? Number(s) : s));
}

// Runs the model's validator on `doc`. Returns {errors: [{path, message,
// keyword, params}], unknown: [path segments]}.
export function validateWithModel(Model, doc) {
  const records = [];
  const proxies = new WeakMap();
  const wrap = (value, segments) => {
    if (!value || typeof value !== "object") return value;
    if (proxies.has(value)) return proxies.get(value);
    const rec = { value, segments, read: new Set(), enumerated: false, isArray: Array.isArray(value) };
    records.push(rec);
    const proxy = new Proxy(value, {
      get(target, key, receiver) {
        const v = Reflect.get(target, key, receiver);
        if (typeof key !== "string") return v;
        if (!rec.isArray) rec.read.add(key);
        if (!Object.prototype.hasOwnProperty.call(target, key)) return v;
        return wrap(v, [...segments, rec.isArray ? Number(key) : key]);
      },
      has(target, key) {
        if (typeof key === "string" && !rec.isArray) rec.read.add(key);
        return Reflect.has(target, key);
      },
      ownKeys(target) {
        rec.enumerated = true;
        return Reflect.ownKeys(target);
      },
    });
    proxies.set(value, proxy);
    return proxy;
  };
  // The old (2.x) models keep their schema id on the prototype.
  const root = Object.assign(Object.create(Model.prototype), doc);
  let raw = [];
  try {
    Model.prototype.validate.call(wrap(root, []));
  } catch (e) {
    raw = e.errors ?? [{ instancePath: "", message: e.message, keyword: "exception" }];
  }
  const errors = [];
  const seen = new Set();
  for (const e of raw) {
    const segments = instancePathToSegments(e.instancePath);
    let message = e.message;
    if (e.keyword === "enum" && e.params?.allowedValues) message += `: ${e.params.allowedValues.join(", ")}`;
    if (e.keyword === "type" && e.params?.type) message = `must be ${e.params.type}`;
    const k = `${pathText(segments)}\0${message}`;
    if (seen.has(k)) continue;
    seen.add(k);
    errors.push({ segments, message, keyword: e.keyword, params: e.params });
  }
  const unknown = [];
  for (const rec of records) {
    if (rec.isArray || rec.enumerated || rec.read.size === 0) continue;
    for (const key of Object.keys(rec.value)) if (!rec.read.has(key)) unknown.push([...rec.segments, key]);
  }
  return { errors, unknown };
}
