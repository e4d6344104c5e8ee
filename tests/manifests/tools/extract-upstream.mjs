#!/usr/bin/env node
// Maintainer tool, not part of the test command: derives upstream.json from
// the CRDs of every Istio and Envoy Gateway release the manifests must work
// on, read from git clones of the two projects (no work tree needed):
//
//   node tools/extract-upstream.mjs [--istio GIT_DIR] [--envoy-gateway GIT_DIR]
//   node tools/extract-upstream.mjs --table   # the README's version table
//
// upstream.json holds facts derived from those CRDs, not the CRDs:
//   - for each kind keyswap ships (KINDS), the schema paths and enum values
//     that some release of the range lacks, with the releases that have them
//     (the check fails a manifest that uses one its stated minimum lacks);
//   - the CEL rules (x-kubernetes-validations) on the paths keyswap's
//     manifests and fixtures use, quoted with the release and file they come
//     from, the defaults inside those paths (the API server defaults before
//     it runs the rules), and the list of every path that carries a rule, so
//     the check can say when a manifest reaches a rule it does not carry.
// Rerun it when the release range, the kinds or the manifests' paths change;
// the check tells which.

import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import YAML from "yaml";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = join(here, "..");
const repoRoot = join(pkg, "..", "..");

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const GIT = {
  istio: opt("--istio", process.env.ISTIO_GIT ?? "/work/.mirror/istio+istio/repo"),
  "envoy-gateway": opt("--envoy-gateway", process.env.ENVOY_GATEWAY_GIT ?? "/work/.mirror/envoyproxy+gateway/repo"),
};

// The releases the manifests must work on, plus the one before the floor
// (Istio 1.18, the release @kubernetes-models/istio@2.3.0 was generated from,
// so the check can cross-check that model against this table). Istio 1.31
// has no final tag in the mirror yet: its last release candidate stands in.
const RANGE = {
  istio: { floor: "1.19", minors: ["1.18", "1.19", "1.20", "1.21", "1.22", "1.23", "1.24", "1.25", "1.26", "1.27", "1.28", "1.29", "1.30", "1.31"] },
  "envoy-gateway": { floor: "v1.3", minors: ["v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9"] },
};
// For the README table only: back to the release that introduced each kind.
const TABLE_MINORS = {
  istio: ["1.12", "1.13", "1.14", "1.15", "1.16", "1.17", ...RANGE.istio.minors],
  "envoy-gateway": ["v1.0", "v1.1", "v1.2", ...RANGE["envoy-gateway"].minors],
};

// apiVersion/kind -> project whose CRDs define it (Gateway API kinds: the
// CRDs Envoy Gateway installs with each release).
export const KINDS = {
  "extensions.istio.io/v1alpha1/WasmPlugin": "istio",
  "networking.istio.io/v1alpha3/EnvoyFilter": "istio",
  "networking.istio.io/v1beta1/ServiceEntry": "istio",
  "networking.istio.io/v1/ServiceEntry": "istio",
  "networking.istio.io/v1beta1/Gateway": "istio",
  "networking.istio.io/v1beta1/VirtualService": "istio",
  "networking.istio.io/v1beta1/DestinationRule": "istio",
  "gateway.envoyproxy.io/v1alpha1/EnvoyExtensionPolicy": "envoy-gateway",
  "gateway.envoyproxy.io/v1alpha1/EnvoyPatchPolicy": "envoy-gateway",
  "gateway.envoyproxy.io/v1alpha1/EnvoyProxy": "envoy-gateway",
  "gateway.envoyproxy.io/v1alpha1/ClientTrafficPolicy": "envoy-gateway",
  "gateway.envoyproxy.io/v1alpha1/Backend": "envoy-gateway",
  "gateway.networking.k8s.io/v1/HTTPRoute": "envoy-gateway",
  "gateway.networking.k8s.io/v1/Gateway": "envoy-gateway",
  "gateway.networking.k8s.io/v1/GatewayClass": "envoy-gateway",
  "gateway.networking.k8s.io/v1/BackendTLSPolicy": "envoy-gateway",
  "gateway.networking.k8s.io/v1alpha3/BackendTLSPolicy": "envoy-gateway",
};

const git = (project, ...a) =>
  execFileSync("git", ["-C", GIT[project], ...a], { encoding: "utf8", maxBuffer: 1 << 30 });

const semverKey = (t) => t.replace(/^v/, "").split(/[.-]/).map((x) => (/^\d+$/.test(x) ? x.padStart(6, "0") : x)).join(".");
const byVersion = (a, b) => (semverKey(a) < semverKey(b) ? -1 : semverKey(a) > semverKey(b) ? 1 : 0);

// The first and the last release of each minor (x.y.0 and its newest patch);
// a minor without a final release uses its newest release candidate.
function releasesOf(project, minors) {
  const tags = git(project, "tag", "--list").split("\n").filter(Boolean);
  const out = [];
  for (const minor of minors) {
    const re = new RegExp(`^${minor.replace(/\./g, "\\.")}\\.\\d+$`);
    let mine = tags.filter((t) => re.test(t)).sort(byVersion);
    if (mine.length === 0) {
      mine = tags.filter((t) => new RegExp(`^${minor.replace(/\./g, "\\.")}\\.0-rc\\.\\d+$`).test(t)).sort(byVersion);
      mine = mine.slice(-1);
    }
    if (mine.length === 0) throw new Error(`${project}: no release tag for ${minor}`);
    out.push(...new Set([mine[0], mine[mine.length - 1]]));
  }
  return out;
}

function crdFiles(project, tag) {
  const files = git(project, "ls-tree", "-r", "--name-only", tag).split("\n");
  const re = project === "istio"
    ? /^manifests\/charts\/base\/(crds|files)\/crd-all\.gen\.yaml$/
    : /^charts\/gateway-helm\/(charts\/crds\/)?crds\/(generated\/gateway\.envoyproxy\.io_[a-z]+|gatewayapi-crds)\.yaml$/;
  const found = files.filter((f) => re.test(f));
  if (found.length === 0) throw new Error(`${project} ${tag}: no CRD files`);
  return found;
}

const crdCache = new Map();
function schemasAt(project, tag) {
  const key = `${project}@${tag}`;
  if (crdCache.has(key)) return crdCache.get(key);
  const out = new Map(); // apiVersion/kind -> {schema, file}
  for (const file of crdFiles(project, tag)) {
    for (const doc of YAML.parseAllDocuments(git(project, "show", `${tag}:${file}`), { version: "1.1" })) {
      const crd = doc.toJS({ maxAliasCount: -1 });
      if (crd?.kind !== "CustomResourceDefinition") continue;
      for (const v of crd.spec.versions ?? []) {
        if (v.served === false) continue;
        out.set(`${crd.spec.group}/${v.name}/${crd.spec.names.kind}`, { schema: v.schema.openAPIV3Schema, file });
      }
    }
  }
  crdCache.set(key, out);
  return out;
}

// Every node of a schema: its path (".spec.x", "[*]" for items, "{*}" for
// map values) and the schema there.
function* nodes(schema, path = "") {
  if (!schema || typeof schema !== "object") return;
  yield [path, schema];
  for (const [k, v] of Object.entries(schema.properties ?? {})) yield* nodes(v, `${path}.${k}`);
  if (schema.items && !Array.isArray(schema.items)) yield* nodes(schema.items, `${path}[*]`);
  if (schema.additionalProperties && typeof schema.additionalProperties === "object") yield* nodes(schema.additionalProperties, `${path}{*}`);
  for (const key of ["allOf", "anyOf", "oneOf"]) for (const s of schema[key] ?? []) yield* nodes(s, path);
}

// [[first, last], ...]: the runs of consecutive releases (in `all`) in `have`.
function runs(have, all) {
  const out = [];
  let start = null;
  all.forEach((r, i) => {
    if (have.has(r) && start === null) start = r;
    if (!have.has(r) && start !== null) { out.push([start, all[i - 1]]); start = null; }
  });
  if (start !== null) out.push([start, all[all.length - 1]]);
  return out;
}

// The concrete paths of the manifests and fixtures, as patterns with [*]
// for list items (map keys are matched against {*} when looked up).
function manifestPaths() {
  const files = [];
  const walkDir = (d) => {
    for (const e of readdirSync(d)) {
      const p = join(d, e);
      if (statSync(p).isDirectory()) { if (e !== "node_modules") walkDir(p); } else if (/\.ya?ml$/.test(e)) files.push(p);
    }
  };
  walkDir(join(repoRoot, "deploy"));
  walkDir(join(pkg, "good"));
  walkDir(join(pkg, "bad"));
  const byKind = new Map();
  for (const f of files) {
    for (const d of YAML.parseAllDocuments(readFileSync(f, "utf8"), { version: "1.1", merge: true })) {
      const doc = d.toJS({ maxAliasCount: -1 });
      if (!doc?.apiVersion || !doc?.kind) continue;
      const key = `${doc.apiVersion}/${doc.kind}`;
      if (!byKind.has(key)) byKind.set(key, new Set());
      const set = byKind.get(key);
      const walk = (v, path) => {
        set.add(path);
        if (Array.isArray(v)) v.forEach((x) => walk(x, `${path}[*]`));
        else if (v && typeof v === "object") for (const [k, x] of Object.entries(v)) walk(x, `${path}.${k}`);
      };
      walk(doc, "");
    }
  }
  return byKind;
}

// Does the schema pattern (with {*}) cover the concrete manifest path?
function covers(pattern, concrete) {
  const re = new RegExp("^" + pattern.replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replace(/\\\{\\\*\\\}/g, "\\.[^.\\[]+") + "$");
  return re.test(concrete);
}

function extract() {
  const releases = {};
  for (const project of Object.keys(RANGE)) releases[project] = releasesOf(project, RANGE[project].minors);
  const used = manifestPaths();
  const out = {
    note: "Derived by tools/extract-upstream.mjs from the Istio and Envoy Gateway CRDs of each release below; see README.md. Do not edit by hand.",
    projects: {},
    kinds: {},
  };
  for (const [project, rels] of Object.entries(releases)) {
    out.projects[project] = {
      floor: RANGE[project].floor,
      releases: rels,
    };
  }
  for (const [kindKey, project] of Object.entries(KINDS)) {
    const rels = releases[project];
    const served = new Set();
    const pathRel = new Map(); // path -> Set(release)
    const enumRel = new Map(); // path\0value -> Set(release)
    const freeRel = new Map(); // path -> Set(release) where it takes any value
    const rules = new Map(); // path\0rule -> {…, releases:Set}
    const defaults = new Map(); // path\0json -> {path, default, releases:Set}
    const rulePaths = new Set();
    const usedPaths = [...(used.get(kindKey) ?? [])];
    const isUsed = (p) => usedPaths.some((c) => covers(p, c));
    for (const rel of rels) {
      const found = schemasAt(project, rel).get(kindKey);
      if (!found) continue;
      served.add(rel);
      const ruleNodes = [];
      for (const [path, s] of nodes(found.schema)) {
        if (!pathRel.has(path)) pathRel.set(path, new Set());
        pathRel.get(path).add(rel);
        for (const v of s.enum ?? []) {
          const k = `${path}\0${v}`;
          if (!enumRel.has(k)) enumRel.set(k, new Set());
          enumRel.get(k).add(rel);
        }
        if (!s.enum) freeRel.set(path, (freeRel.get(path) ?? new Set()).add(rel));
        const xv = s["x-kubernetes-validations"] ?? [];
        if (xv.length) rulePaths.add(path);
        if (xv.length && isUsed(path)) ruleNodes.push(path);
        for (const r of xv) {
          if (!isUsed(path)) continue;
          const k = `${path}\0${r.rule}\0${r.message ?? ""}\0${r.messageExpression ?? ""}\0${r.fieldPath ?? ""}`;
          if (!rules.has(k)) {
            rules.set(k, {
              path, rule: r.rule,
              ...(r.message !== undefined && { message: r.message }),
              ...(r.messageExpression !== undefined && { messageExpression: r.messageExpression }),
              ...(r.fieldPath !== undefined && { fieldPath: r.fieldPath }),
              ...(r.reason !== undefined && { reason: r.reason }),
              source: `${project === "istio" ? "istio/istio" : "envoyproxy/gateway"}@${rel}:${found.file}`,
              releases: new Set(),
            });
          }
          rules.get(k).releases.add(rel);
        }
      }
      // Defaults inside the subtrees of the carried rules.
      for (const [path, s] of nodes(found.schema)) {
        if (s.default === undefined) continue;
        if (!ruleNodes.some((r) => path.startsWith(r)) || !isUsedPrefix(path, usedPaths)) continue;
        const k = `${path}\0${JSON.stringify(s.default)}`;
        if (!defaults.has(k)) defaults.set(k, { path, default: s.default, releases: new Set() });
        defaults.get(k).releases.add(rel);
      }
    }
    if (served.size === 0) throw new Error(`${kindKey}: served by no ${project} release`);
    // A release where the path has no enum accepts every value.
    for (const [key, set] of enumRel) for (const r of freeRel.get(key.split("\0")[0]) ?? []) set.add(r);
    const all = new Set(rels);
    const uniform = (set) => set.size === all.size;
    const k = {
      project,
      served: runs(served, rels),
      // A path whose releases are its parent's adds nothing: a manifest
      // cannot use it without the parent.
      paths: [...pathRel].filter(([path, s]) => !uniform(s) && !sameAs(s, pathRel.get(parentOf(path)) ?? served))
        .map(([path, s]) => ({ path, releases: runs(s, rels) })),
      enums: [...enumRel].filter(([key, s]) => !sameAs(s, pathRel.get(key.split("\0")[0]))).map(([key, s]) => {
        const [path, value] = key.split("\0");
        return { path, value, releases: runs(s, rels) };
      }),
      rules: [...rules.values()].map((r) => ({ ...r, releases: runs(r.releases, rels) })),
      defaults: [...defaults.values()].map((d) => ({ ...d, releases: runs(d.releases, rels) })),
      rulePaths: [...rulePaths].sort(),
    };
    out.kinds[kindKey] = k;
  }
  return out;
}

// A default matters when its parent object can be in a manifest: the parent
// path (or the root) is among the used paths.
function isUsedPrefix(path, usedPaths) {
  const parent = parentOf(path);
  return parent === "" || usedPaths.some((c) => covers(parent, c));
}
const parentOf = (path) => (path === "" ? null : path.replace(/(\.[^.[{]+|\[\*\]|\{\*\})$/, ""));
const sameAs = (a, b) => a.size === b.size && [...a].every((x) => b.has(x));

// The README table: the first release (back to the kind's introduction) that
// accepts each field or value keyswap's manifests use.
const TABLE = [
  ["extensions.istio.io/v1alpha1/WasmPlugin", [".spec.selector", ".spec.targetRef", ".spec.targetRefs", ".spec.match", ".spec.url", ".spec.imagePullPolicy", ".spec.phase", ".spec.failStrategy", ".spec.failStrategy=FAIL_CLOSE", ".spec.vmConfig.env[*].valueFrom", ".spec.vmConfig.env[*].valueFrom=HOST", ".spec.pluginConfig", ".spec.type"]],
  ["networking.istio.io/v1alpha3/EnvoyFilter", [".spec.workloadSelector", ".spec.targetRefs", ".spec.configPatches[*].applyTo=CLUSTER", ".spec.configPatches[*].applyTo=NETWORK_FILTER", ".spec.configPatches[*].match.context=GATEWAY", ".spec.configPatches[*].match.cluster.service", ".spec.configPatches[*].patch.operation=MERGE"]],
  ["gateway.envoyproxy.io/v1alpha1/EnvoyExtensionPolicy", [".spec.targetRef", ".spec.targetRefs", ".spec.wasm[*].code.image.url", ".spec.wasm[*].failOpen", ".spec.wasm[*].env.hostKeys", ".spec.wasm[*].config"]],
  ["gateway.envoyproxy.io/v1alpha1/EnvoyPatchPolicy", [".spec.targetRef", ".spec.type=JSONPatch", ".spec.jsonPatches", ".spec.jsonPatches[*].operation.value"]],
  ["gateway.envoyproxy.io/v1alpha1/EnvoyProxy", [".spec.provider.kubernetes.envoyDeployment.container.env", ".spec.provider.kubernetes.envoyDeployment.container.volumeMounts", ".spec.provider.kubernetes.envoyDeployment.pod.volumes", ".spec.provider.kubernetes.envoyDeployment.pod", ".spec.bootstrap.type=Merge", ".spec.bootstrap.value"]],
  ["gateway.envoyproxy.io/v1alpha1/ClientTrafficPolicy", [".spec.targetRefs", ".spec.headers.withUnderscoresAction", ".spec.headers.withUnderscoresAction=RejectRequest"]],
];

function table() {
  const lines = ["| kind | field or value | first release that accepts it | gone in |", "|---|---|---|---|"];
  for (const [kindKey, fields] of TABLE) {
    const project = KINDS[kindKey];
    const rels = releasesOf(project, TABLE_MINORS[project]);
    for (const f of fields) {
      const [path, value] = f.split("=");
      const have = [];
      for (const rel of rels) {
        const found = schemasAt(project, rel).get(kindKey);
        if (!found) continue;
        for (const [p, s] of nodes(found.schema)) {
          if (p !== path) continue;
          if (value === undefined || !s.enum || s.enum.includes(value)) { have.push(rel); break; }
        }
      }
      const first = have[0] ?? "not in any release";
      const gone = have.length && have[have.length - 1] !== rels[rels.length - 1]
        ? rels[rels.indexOf(have[have.length - 1]) + 1] : "";
      const kind = kindKey.split("/").pop();
      const label = value === undefined ? `\`${path.slice(1)}\`` : `\`${path.slice(1)}: ${value}\``;
      lines.push(`| ${kind} | ${label} | ${first === rels[0] ? `${first} or earlier` : first} | ${gone} |`);
    }
  }
  return lines.join("\n");
}

// JSON with one line per path, value, rule or default, so diffs stay readable.
function compactJSON(v, depth = 0) {
  const pad = " ".repeat(depth + 1);
  if (Array.isArray(v) && v.length && v.every((x) => x && typeof x === "object" && !Array.isArray(x))) {
    return "[\n" + v.map((x) => pad + JSON.stringify(x)).join(",\n") + "\n" + " ".repeat(depth) + "]";
  }
  if (v && typeof v === "object" && !Array.isArray(v)) {
    const entries = Object.entries(v).map(([k, x]) => pad + JSON.stringify(k) + ": " + compactJSON(x, depth + 1));
    return "{\n" + entries.join(",\n") + "\n" + " ".repeat(depth) + "}";
  }
  return JSON.stringify(v);
}

if (args.includes("--table")) {
  console.log(table());
} else {
  const data = extract();
  const file = join(pkg, "upstream.json");
  writeFileSync(file, compactJSON(data) + "\n");
  const counts = Object.entries(data.kinds).map(([k, v]) => `${k.split("/").pop()}: ${v.paths.length} paths, ${v.enums.length} values, ${v.rules.length} rules`);
  console.log(`${relative(process.cwd(), file)}:\n  ${counts.join("\n  ")}`);
}
