// The CRDs' x-kubernetes-validations rules, run the way the API server runs
// them on a create: after defaulting, each rule on every node of its path
// that the object has, with `self` bound to that node. Evaluated by
// @bufbuild/cel (a CEL implementation checked against the cel-spec
// conformance tests) with the libraries Kubernetes adds that the carried
// rules use: cel-go's strings extension (split, upperAscii, …) and the
// Kubernetes URL library (isURL, url, getScheme, …), written below after
// k8s.io/apiserver/pkg/cel/library/urls.go. Transition rules (those that
// read oldSelf) do not run on a create and are skipped.

import { celFunc, celMethod, CelScalar, isCelError, mapType, parse, plan, celEnv } from "@bufbuild/cel";
import { strings } from "@bufbuild/cel/ext";
import { nodesAt } from "./paths.mjs";

// Go's url.ParseRequestURI, which the Kubernetes URL library uses for isURL
// and url(): an absolute URI or an absolute path, no fragment. Returns the
// scheme and host, or null where Go returns an error.
export function parseRequestURI(s) {
  if (/[\x00-\x1f\x7f]/.test(s)) return null; // "net/url: invalid control character in URL"
  if (s === "") return null;
  if (s === "*") return { scheme: "", host: "" };
  let rest = s;
  let scheme = "";
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(rest);
  if (m) {
    scheme = m[1].toLowerCase();
    rest = rest.slice(m[0].length);
  } else if (rest.startsWith(":")) {
    return null; // "missing protocol scheme"
  }
  if (rest.includes("?")) rest = rest.slice(0, rest.indexOf("?"));
  if (!rest.startsWith("/")) {
    if (scheme !== "") return { scheme, host: "" }; // opaque: mailto:x
    return null; // "invalid URI for request"
  }
  let host = "";
  if (scheme !== "" && rest.startsWith("//")) {
    let authority = rest.slice(2);
    const slash = authority.indexOf("/");
    if (slash >= 0) {
      rest = authority.slice(slash);
      authority = authority.slice(0, slash);
    } else {
      rest = "";
    }
    const at = authority.lastIndexOf("@");
    if (at >= 0) {
      if (!/^[A-Za-z0-9\-._:~!$&'()*+,;=%@]*$/.test(authority.slice(0, at))) return null; // invalid userinfo
      authority = authority.slice(at + 1);
    }
    host = authority;
    // parseHost: an IP literal in brackets, else host[:port] with a numeric port.
    let port = "";
    if (host.startsWith("[")) {
      const close = host.indexOf("]");
      if (close < 0) return null; // "missing ']' in host"
      port = host.slice(close + 1);
      if (port !== "" && !/^:\d*$/.test(port)) return null;
    } else {
      const colon = host.lastIndexOf(":");
      if (colon >= 0) {
        port = host.slice(colon);
        if (!/^:\d*$/.test(port)) return null; // "invalid port"
      }
    }
    if (/%(?![0-9A-Fa-f]{2})/.test(host)) return null;
  }
  if (/%(?![0-9A-Fa-f]{2})/.test(rest)) return null; // "invalid URL escape"
  return { scheme, host };
}

const URL_TYPE = mapType(CelScalar.STRING, CelScalar.STRING);
const k8sUrls = [
  celFunc("isURL", [CelScalar.STRING], CelScalar.BOOL, (s) => parseRequestURI(s) !== null),
  celFunc("url", [CelScalar.STRING], URL_TYPE, (s) => {
    const u = parseRequestURI(s);
    if (!u) throw new Error(`URL parse error during conversion from string: ${s}`);
    return new Map([["scheme", u.scheme], ["host", u.host]]);
  }),
  celMethod("getScheme", URL_TYPE, [], CelScalar.STRING, function () {
    return this.get("scheme");
  }),
  celMethod("getHost", URL_TYPE, [], CelScalar.STRING, function () {
    return this.get("host");
  }),
];

const env = celEnv({ funcs: [...strings, ...k8sUrls] });
const programs = new Map();
function program(expr) {
  if (!programs.has(expr)) programs.set(expr, plan(env, parse(expr)));
  return programs.get(expr);
}

// JSON value -> CEL input: objects as maps, integers as int.
function toCel(v) {
  if (Array.isArray(v)) return v.map(toCel);
  if (v && typeof v === "object") return new Map(Object.entries(v).map(([k, x]) => [k, toCel(x)]));
  if (typeof v === "number" && Number.isInteger(v)) return BigInt(v);
  return v;
}

export function evaluate(expr, self) {
  try {
    const r = program(expr)({ self: toCel(self) });
    if (isCelError(r)) return { error: r.message };
    return { value: r };
  } catch (e) {
    return { error: e.message };
  }
}

// Applies the schema defaults active in this release, top down: a default is
// set where its parent object exists and the field does not.
export function applyDefaults(doc, defaults) {
  const sorted = [...defaults].sort((a, b) => a.path.length - b.path.length);
  for (const d of sorted) {
    const m = /^(.*?)(?:\.([^.[{]+)|(\[\*\])|(\{\*\}))$/.exec(d.path);
    if (!m || !m[2]) continue; // defaults of list items or map values: none in these CRDs
    for (const { value: parent } of nodesAt(doc, m[1])) {
      if (parent && typeof parent === "object" && !Array.isArray(parent) && parent[m[2]] === undefined) {
        parent[m[2]] = structuredClone(d.default);
      }
    }
  }
  return doc;
}

// Runs `rules` (upstream.json entries active in this release) on a defaulted
// copy of doc. Returns [{segments, message, rule}].
export function runRules(doc, rules) {
  const out = [];
  for (const r of rules) {
    if (/\boldSelf\b/.test(r.rule)) continue;
    for (const { value, segments } of nodesAt(doc, r.path)) {
      const res = evaluate(r.rule, value);
      if (!res.error && res.value === true) continue;
      let message;
      if (res.error) {
        message = `rule could not be evaluated: ${res.error}`;
      } else if (r.messageExpression) {
        const mr = evaluate(r.messageExpression, value);
        message = !mr.error && typeof mr.value === "string" && mr.value !== "" ? mr.value : r.message ?? `failed rule: ${r.rule}`;
      } else {
        message = r.message ?? `failed rule: ${r.rule}`;
      }
      let at = segments;
      if (r.fieldPath) at = [...segments, ...r.fieldPath.replace(/^\./, "").split(".")];
      out.push({ segments: at, message, rule: r.rule });
    }
  }
  return out;
}
