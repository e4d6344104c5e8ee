#!/usr/bin/env node
// Checks Kubernetes manifests against the schemas of the control planes
// keyswap ships for; run through scripts/check-manifests (README.md here).
//
//   node check.mjs [FILE|-]...   every YAML document of each file (- is stdin;
//                                default: every *.yaml under deploy/)
//   node check.mjs --self-test   bad/ must each be refused with the message
//                                their `# expect:` line gives, good/ must pass
//
// One line per document: `FILE: Kind/name: ok (…)`, or one line per error,
// `FILE: Kind/name: field.path: message`. Exit 1 on any error.

import { readFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, relative, resolve, isAbsolute } from "node:path";
import { fileURLToPath } from "node:url";
import YAML from "yaml";
import { findModel, validateWithModel, pathText, ISTIO_118 } from "./lib/schema.mjs";
import { applyDefaults, runRules, parseRequestURI } from "./lib/cel.mjs";
import { compareVersions, describe, expand, PROJECT_NAMES, statedMinimum, targetReleases, versionErrors } from "./lib/versions.mjs";
import { matches } from "./lib/paths.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(here, "..", "..");
const upstream = JSON.parse(readFileSync(join(here, "upstream.json"), "utf8"));

// Documents that are not whole objects: the kind each is validated as, and
// why it may lack apiVersion and kind. Validated as far as a partial object
// can be: every field it has must be a field of that kind (strategic-merge
// directives like $patch aside), with the right type; required fields are
// not required.
const PARTIAL = {
  "deploy/istio/gateway-patch.yaml": {
    apiVersion: "apps/v1",
    kind: "Deployment",
    reason: "a strategic-merge patch for keyswap's gateway Deployment (kubectl patch --patch-file), not a whole object",
  },
};

// Groups whose kinds need release data (upstream.json) besides a model.
const UPSTREAM_GROUPS = /(^|\.)istio\.io$|(^|\.)envoyproxy\.io$|^gateway\.networking\.(x-)?k8s\.io$/;

function displayName(file) {
  if (file === "-") return "<stdin>";
  const abs = resolve(file);
  const rel = relative(ROOT, abs);
  return rel.startsWith("..") || isAbsolute(rel) ? file : rel;
}

// The comment lines before a document's content (where `# requires:` and
// `# expect:` go).
function leadingComment(doc) {
  const parts = [doc.commentBefore];
  const c = doc.contents;
  if (c) {
    parts.push(c.commentBefore);
    if (c.items?.[0]?.key) parts.push(c.items[0].key.commentBefore);
  }
  return parts.filter(Boolean).join("\n");
}

// YAML as kubectl reads it (sigs.k8s.io/yaml over go-yaml v2): YAML 1.1
// scalars (yes/no are booleans), `<<` merge keys, anchors and aliases,
// duplicate keys refused, timestamps left as strings.
const YAML_OPTIONS = {
  version: "1.1",
  merge: true,
  uniqueKeys: true,
  customTags: (tags) => tags.filter((t) => t.tag !== "tag:yaml.org,2002:timestamp"),
};

export function parseDocuments(text) {
  const docs = [];
  for (const d of YAML.parseAllDocuments(text, YAML_OPTIONS)) {
    const comment = leadingComment(d);
    if (d.errors.length) {
      docs.push({ comment, yamlError: d.errors.map((e) => e.message.split("\n")[0]).join("; ") });
      continue;
    }
    let value;
    try {
      // Through JSON, as kubectl sends it: an alias becomes a copy, so an
      // error in an anchored node is reported at every place it is used.
      value = JSON.parse(JSON.stringify(d.toJS({ maxAliasCount: 100 })) ?? "null");
    } catch (e) {
      docs.push({ comment, yamlError: e.message });
      continue;
    }
    docs.push({ comment, value });
  }
  return docs;
}

function mergeByRelease(found, all) {
  // found: [{release, segments, message, rule}] -> lines, one per path+message
  const groups = new Map();
  for (const f of found) {
    const k = `${pathText(f.segments)}\0${f.message}`;
    if (!groups.has(k)) groups.set(k, { ...f, releases: [] });
    const g = groups.get(k);
    g.releases.push(f.release);
    g.rule = f.rule; // the newest release's wording
    g.source = f.source;
  }
  return [...groups.values()].map((g) => ({ ...g, releasesText: describe(g.releases, all) }));
}

export async function checkDocument(file, { value: doc, comment, yamlError }, index) {
  const where = displayName(file);
  if (yamlError) return { label: `${where}: document ${index + 1}`, errors: [`YAML: ${yamlError}`] };
  if (doc === null || doc === undefined) return null; // an empty document, as kubectl skips it
  if (typeof doc !== "object" || Array.isArray(doc)) return { label: `${where}: document ${index + 1}`, errors: ["not a mapping"] };

  let { apiVersion, kind } = doc;
  let target = doc;
  let partial = null;
  const name = doc.metadata?.name;
  let label = `${where}: ${kind ?? "?"}/${name ?? `document ${index + 1}`}`;
  if (apiVersion === undefined && kind === undefined) {
    partial = PARTIAL[where];
    if (!partial) {
      return {
        label: `${where}: document ${index + 1}`,
        errors: ["no apiVersion and kind: not a Kubernetes object (a patch file must be listed in PARTIAL in tests/manifests/check.mjs, with the kind it patches and why)"],
      };
    }
    ({ apiVersion, kind } = partial);
    target = { apiVersion, kind, metadata: { name: "patch" }, ...doc };
    label = `${where}: ${kind} patch`;
  }
  if (typeof apiVersion !== "string" || typeof kind !== "string") return { label, errors: ["apiVersion and kind must both be strings"] };

  const errors = [];
  const notes = [];
  const model = await findModel(apiVersion, kind);
  if (!model) return { label, errors: [`${apiVersion} ${kind}: no model for this kind in the npm models this check uses (package.json)`] };
  notes.push(model.label.replace(/ \(.*/, ""));

  const kindKey = `${apiVersion}/${kind}`;
  const group = apiVersion.includes("/") ? apiVersion.split("/")[0] : "";
  const kindData = upstream.kinds[kindKey];
  if (!kindData && UPSTREAM_GROUPS.test(group)) {
    errors.push(`${apiVersion} ${kind}: no release data (CEL rules, versions) for this kind: add it to KINDS in tests/manifests/tools/extract-upstream.mjs and rerun it`);
  }
  const project = kindData?.project;
  const { releases, floor } = kindData ? upstream.projects[project] : {};
  const stated = kindData ? statedMinimum(comment, project) : null;
  const minimum = stated ?? floor;
  const targets = kindData ? targetReleases(releases, minimum) : [];

  const schema = validateWithModel(model.Model, target);
  for (const e of schema.errors) {
    if (partial && e.keyword === "required") continue;
    errors.push(`${pathText(e.segments) || "(root)"}: ${e.message} (${model.label})`);
  }
  for (const u of schema.unknown) {
    if (partial && String(u[u.length - 1]).startsWith("$")) continue;
    // A field newer than the model that every target release has (the
    // manifest states a minimum past the model's release).
    const newer = kindData?.paths.find((p) => matches(p.path, u) && targets.every((r) => expand(p.releases, releases).includes(r)));
    if (newer) {
      notes.push(`${pathText(u)} is newer than the model: checked against the release data only`);
      continue;
    }
    errors.push(`${pathText(u)}: unknown field (not in ${model.label})`);
  }
  if (partial) notes.push(`allow-listed as a patch: ${partial.reason}`);

  if (kindData) {
    const pname = PROJECT_NAMES[project];
    if (stated && compareVersions(stated, floor) < 0) notes.push(`states ${pname} >= ${stated}, below the project's floor ${floor}`);
    for (const v of versionErrors(doc, kindKey, kindData, project, releases, targets, minimum)) {
      errors.push(`${pathText(v.segments) || "(root)"}: ${v.message}`);
    }
    // CEL rules, release by release.
    const found = [];
    let ruleCount = 0;
    for (const release of targets) {
      const active = (entries) => entries.filter((e) => expand(e.releases, releases).includes(release));
      const rules = active(kindData.rules);
      ruleCount = Math.max(ruleCount, rules.length);
      const defaulted = applyDefaults(structuredClone(doc), active(kindData.defaults));
      for (const f of runRules(defaulted, rules)) {
        found.push({ ...f, release, source: rules.find((r) => r.rule === f.rule)?.source });
      }
    }
    for (const g of mergeByRelease(found, releases)) {
      errors.push(`${pathText(g.segments) || "(root)"}: ${g.message} (CEL rule \`${g.rule.replace(/\s*\n\s*/g, " ")}\`, ${pname} ${g.releasesText}; ${g.source})`);
    }
    notes.push(`${ruleCount} CEL rules`, `${pname} ${describe(targets, releases)}`);

    // Istio 1.18's model must agree with the release data: whatever it
    // refuses must be something upstream.json says 1.18 lacks.
    if (project === "istio") {
      const old = await findModel(apiVersion, kind, [ISTIO_118]);
      const r118 = releases.filter((r) => r.startsWith("1.18."));
      const lacks118 = (have) => r118.some((r) => !have.includes(r));
      const explained = (segments, value) => {
        if (lacks118(expand(kindData.served, releases))) return true;
        for (const p of kindData.paths) {
          const have = expand(p.releases, releases);
          for (let n = 1; n <= segments.length; n++) if (lacks118(have) && matches(p.path, segments.slice(0, n))) return true;
        }
        return kindData.enums.some((e) => e.value === value && matches(e.path, segments) && lacks118(expand(e.releases, releases)));
      };
      if (old) {
        const r = validateWithModel(old.Model, doc);
        const refused = [
          ...r.errors.filter((e) => e.keyword !== "required").map((e) => [e.segments, e.message]),
          ...r.unknown.map((u) => [u, "unknown field"]),
        ];
        // What the newest model refuses too is reported already.
        const already = new Set([...schema.errors.map((e) => e.segments), ...schema.unknown].map(pathText));
        for (const [segments, message] of refused) {
          if (already.has(pathText(segments))) continue;
          let value = doc;
          for (const s of segments) value = value?.[s];
          if (!explained(segments, value)) {
            errors.push(`${pathText(segments)}: ${old.label} refuses it (${message}) but upstream.json says Istio 1.18 accepts it: rerun tests/manifests/tools/extract-upstream.mjs`);
          }
        }
        notes.push(`cross-checked with ${old.label.replace(/ \(.*/, "")}`);
      }
    }
  }
  return { label, errors, notes };
}

export async function checkText(file, text) {
  const results = [];
  const docs = parseDocuments(text);
  for (let i = 0; i < docs.length; i++) {
    const r = await checkDocument(file, docs[i], i);
    if (r) results.push({ ...r, comment: docs[i].comment });
  }
  if (results.length === 0) results.push({ label: `${displayName(file)}`, errors: ["no Kubernetes object in this file"] });
  return results;
}

function printResults(results) {
  let bad = 0;
  for (const r of results) {
    if (r.errors.length === 0) {
      console.log(`${r.label}: ok (${r.notes.join("; ")})`);
    } else {
      bad++;
      for (const e of r.errors) console.log(`${r.label}: ${e}`);
    }
  }
  return bad;
}

function yamlFilesUnder(dir) {
  const out = [];
  for (const e of readdirSync(dir).sort()) {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) out.push(...yamlFilesUnder(p));
    else if (/\.ya?ml$/.test(e)) out.push(p);
  }
  return out;
}

async function selfTest() {
  let passed = 0;
  let failed = 0;
  const fail = (what, why, lines) => {
    failed++;
    console.log(`self-test: FAIL ${what}: ${why}`);
    for (const l of lines ?? []) console.log(`    ${l}`);
  };
  // The Kubernetes URL library's isURL is Go's url.ParseRequestURI.
  const urls = [
    ["oci://registry.example.com/keyswap/filter:0.1.0", "oci"], ["https://h:8443/x?y=1", "https"], ["/abs/path", ""],
    ["mailto:x@example.com", "mailto"], ["registry.example.com/keyswap/filter:0.1.0", null], ["", null], ["http://h:port/", null],
    ["http://h/%zz", null], ["rel/path", null], ["HTTP://H/", "http"],
  ];
  for (const [s, scheme] of urls) {
    const got = parseRequestURI(s);
    if ((got?.scheme ?? null) === scheme) passed++;
    else fail(`parseRequestURI(${JSON.stringify(s)})`, `scheme ${JSON.stringify(got?.scheme ?? null)}, want ${JSON.stringify(scheme)}`);
  }
  for (const file of yamlFilesUnder(join(here, "good"))) {
    const results = await checkText(file, readFileSync(file, "utf8"));
    const errs = results.flatMap((r) => r.errors.map((e) => `${r.label}: ${e}`));
    if (errs.length) fail(displayName(file), "a good fixture is refused", errs);
    else {
      passed++;
      console.log(`self-test: ${displayName(file)}: passes (${results.length} documents)`);
    }
  }
  for (const file of yamlFilesUnder(join(here, "bad"))) {
    const text = readFileSync(file, "utf8");
    const expect = /^#\s*expect:\s*(.+)$/m.exec(text)?.[1].trim();
    const results = await checkText(file, text);
    const lines = results.flatMap((r) => r.errors.map((e) => `${r.label}: ${e}`));
    if (!expect) fail(displayName(file), "no `# expect:` line");
    else if (lines.length === 0) fail(displayName(file), `accepted, but must be refused with: ${expect}`);
    else if (!lines.some((l) => l.includes(expect))) fail(displayName(file), `refused, but not with: ${expect}`, lines);
    else {
      passed++;
      console.log(`self-test: ${displayName(file)}: refused as expected (${expect})`);
    }
  }
  console.log(`self-test: ${passed} passed, ${failed} failed`);
  return failed === 0;
}

async function main(argv) {
  if (argv.includes("-h") || argv.includes("--help")) {
    console.log("usage: scripts/check-manifests [--self-test] [FILE|-]...");
    return 0;
  }
  if (argv[0] === "--self-test") return (await selfTest()) ? 0 : 1;
  const files = argv.length ? argv : yamlFilesUnder(join(ROOT, "deploy"));
  if (files.length === 0) {
    console.log("no manifest to check");
    return 1;
  }
  let bad = 0;
  for (const file of files) {
    let text;
    try {
      text = file === "-" ? readFileSync(0, "utf8") : readFileSync(file, "utf8");
    } catch (e) {
      console.log(`${displayName(file)}: cannot read: ${e.message}`);
      bad++;
      continue;
    }
    bad += printResults(await checkText(file, text));
  }
  return bad ? 1 : 0;
}

process.exitCode = await main(process.argv.slice(2));
