// Which releases a manifest must work on, and what upstream.json says each
// of them lacks.

import { matches, parsePattern } from "./paths.mjs";

export const PROJECT_NAMES = { istio: "Istio", "envoy-gateway": "Envoy Gateway" };

function parts(v) {
  const [core, pre] = v.replace(/^v/, "").split(/-(.*)/s);
  return { nums: core.split(".").map(Number), pre: pre ?? null };
}
export function compareVersions(a, b) {
  const x = parts(a);
  const y = parts(b);
  for (let i = 0; i < 3; i++) {
    const d = (x.nums[i] ?? 0) - (y.nums[i] ?? 0);
    if (d) return d;
  }
  if (x.pre === y.pre) return 0;
  if (x.pre === null) return 1;
  if (y.pre === null) return -1;
  return x.pre < y.pre ? -1 : 1;
}

// A comment line in a document states its minimum release:
//   # requires: Istio >= 1.22
//   # requires: Envoy Gateway >= v1.5
export function statedMinimum(comment, project) {
  const name = PROJECT_NAMES[project].replace(" ", "\\s+");
  const m = new RegExp(`^\\s*requires:\\s*${name}\\s*>=\\s*(v?\\d+\\.\\d+(?:\\.\\d+)?)\\s*$`, "im").exec(comment ?? "");
  return m ? m[1] : null;
}

// The releases of the scanned list a manifest stating `minimum` must work on.
export function targetReleases(releases, minimum) {
  return releases.filter((r) => compareVersions(r, minimum) >= 0);
}

// "1.19.0 to 1.21.6, 1.23.0": the runs of `subset` in the ordered `all`.
export function describe(subset, all) {
  const have = new Set(subset);
  const out = [];
  let start = null;
  let prev = null;
  for (const r of all) {
    if (have.has(r)) {
      if (start === null) start = r;
      prev = r;
    } else if (start !== null) {
      out.push(start === prev ? start : `${start} to ${prev}`);
      start = null;
    }
  }
  if (start !== null) out.push(start === prev ? start : `${start} to ${prev}`);
  return out.join(", ");
}

// upstream.json's [[first, last], …] as the list of releases it covers.
export function expand(runs, releases) {
  const out = [];
  for (const [a, b] of runs) {
    const i = releases.indexOf(a);
    const j = releases.indexOf(b);
    if (i < 0 || j < 0) throw new Error(`upstream.json: unknown release in ${a}..${b}`);
    out.push(...releases.slice(i, j + 1));
  }
  return out;
}

const compiled = new WeakMap();
function entriesOf(kindData, releases) {
  if (compiled.has(kindData)) return compiled.get(kindData);
  const c = {
    served: expand(kindData.served, releases),
    paths: kindData.paths.map((p) => ({ ...p, segs: parsePattern(p.path), have: expand(p.releases, releases) })),
    enums: kindData.enums.map((e) => ({ ...e, have: expand(e.releases, releases) })),
    rulePaths: kindData.rulePaths,
    carried: new Set(kindData.rules.map((r) => r.path)),
  };
  compiled.set(kindData, c);
  return c;
}

// Every [segments, value] of a document, parents before children.
export function* walk(value, segments = []) {
  yield [segments, value];
  if (Array.isArray(value)) for (let i = 0; i < value.length; i++) yield* walk(value[i], [...segments, i]);
  else if (value && typeof value === "object") for (const [k, v] of Object.entries(value)) yield* walk(v, [...segments, k]);
}

// Errors for the paths and enum values this document uses that some target
// release lacks, and for rule-carrying paths whose rules upstream.json does
// not carry. Returns [{segments, message}].
export function versionErrors(doc, kindKey, kindData, project, releases, targets, minimumText) {
  const c = entriesOf(kindData, releases);
  const name = PROJECT_NAMES[project];
  const out = [];
  const lacking = (have) => targets.filter((r) => !have.includes(r));
  const [apiVersion, kind] = [kindKey.slice(0, kindKey.lastIndexOf("/")), kindKey.slice(kindKey.lastIndexOf("/") + 1)];
  const notServed = lacking(c.served);
  if (notServed.length) {
    out.push({ segments: [], message: `${apiVersion} ${kind}: not served by ${name} ${describe(notServed, releases)} (served by ${describe(c.served, releases)}); this manifest states ${name} >= ${minimumText}` });
    return out;
  }
  const reported = [];
  const under = (segs) => reported.some((r) => r.length <= segs.length && r.every((x, i) => x === segs[i]));
  for (const [segments, value] of walk(doc)) {
    if (segments.length === 0 || under(segments)) continue;
    for (const p of c.paths) {
      if (!matches(p.path, segments)) continue;
      const miss = lacking(p.have);
      if (miss.length) {
        out.push({ segments, message: `not in ${name} ${describe(miss, releases)} (in ${describe(p.have, releases)}); this manifest states ${name} >= ${minimumText}` });
        reported.push(segments);
      }
    }
    if (under(segments)) continue;
    if (typeof value === "string") {
      for (const e of c.enums) {
        if (e.value !== value || !matches(e.path, segments)) continue;
        const miss = lacking(e.have);
        if (miss.length) {
          out.push({ segments, message: `${value}: not in ${name} ${describe(miss, releases)} (in ${describe(e.have, releases)}); this manifest states ${name} >= ${minimumText}` });
        }
      }
    }
    for (const rp of c.rulePaths) {
      if (!c.carried.has(rp) && matches(rp, segments)) {
        out.push({ segments, message: `the CRD has CEL rules here (${rp}) that tests/manifests/upstream.json does not carry: rerun tests/manifests/tools/extract-upstream.mjs (see tests/manifests/README.md)` });
      }
    }
  }
  return out;
}
