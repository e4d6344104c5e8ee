//! Shipping the module (issue 14): the plugin image Istio and Envoy Gateway
//! fetch from a registry, and the http(s) + sha256 form Envoy fetches
//! itself.
//!
//! ```text
//! scripts/image ─▶ OCI layout ─skopeo copy─▶ docker-registry (loopback) ─▶ pulled over /v2/
//!                                                                          └▶ fetch_plugin: the fetchers' rules
//! ModuleServer (loopback, the .wasm) ◀─ vm_config.code.remote {http_uri, sha256} ─ Envoy ─▶ echo
//! ```
//!
//! [`fetch_plugin`] transcribes what both control planes do with a pulled
//! image; Envoy Gateway's `internal/wasm/imagefetcher.go` is a copy of
//! Istio's `pkg/wasm/imagefetcher.go` (Istio 1.19.0 through 1.30 and
//! master differ only in the SSRF guards and a configurable size limit,
//! Envoy Gateway v1.3 through main only in a CA option and size checks).
//! Both registries and servers here listen on 127.0.0.1 only and are
//! killed on drop.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sha256_hex;

use serde_json::{json, Value};

use keyswap_tests::echo::{Echo, Echoed};
use keyswap_tests::envoy::{filter_wasm, gateway, repo_root, tail, Envoy, Launch, Listener, ROUTE_HEADER};
use keyswap_tests::http::{Request, Response};
use keyswap_tests::revocation::free_port;
use keyswap_tests::server::{Reply, Server};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// go-containerregistry `types.OCILayer`: the compat variant's layer.
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// `types.DockerManifestSchema2` and `types.DockerLayer`: the Docker form.
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The *oci* variant's raw-wasm layer (`wasmLayerMediaType` in
/// `extractOCIArtifactImage`), and what the old README's `oras push` made.
const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// Both fetchers read at most 256 MiB of a module (Istio:
/// `features.MaxWasmBinarySizeBytes`, `ISTIO_WASM_MAX_BINARY_SIZE_BYTES`
/// from 1.30, a constant before; Envoy Gateway: `maxWasmSize`).
const MAX_WASM: usize = 256 << 20;
/// The repository the images are pushed to, as the docs name it.
const REPOSITORY: &str = "keyswap/filter";

// ---- the fetchers' rules ------------------------------------------------------

/// How a fetcher read the module out of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Docker manifest, last layer `DOCKER_LAYER` (`extractDockerImage`).
    Docker,
    /// OCI manifest, last layer `OCI_LAYER` (`extractOCIStandardImage`).
    Compat,
    /// Exactly two layers, one `WASM_LAYER` (`extractOCIArtifactImage`).
    Oci,
}

/// The module Istio's and Envoy Gateway's image fetchers take from a pulled
/// image, or why they take none: `ImageFetcher.PrepareFetch`'s
/// `binaryFetcher` in Istio `pkg/wasm/imagefetcher.go` (1.19.0 and master
/// alike) and Envoy Gateway `internal/wasm/imagefetcher.go`, then the
/// `isValidWasmBinary` check both `cache.go`s apply to what it returns.
/// `blob` fetches a descriptor's blob (checked against its digest and size,
/// as go-containerregistry does).
///
/// 1. A manifest whose `mediaType` is `DOCKER_MANIFEST` is read only as a
///    Docker image: its LAST layer must be `DOCKER_LAYER`.
/// 2. Anything else is tried as the compat variant: the LAST layer must be
///    `OCI_LAYER` (other layers are ignored; at least one is required).
/// 3. Failing that, as the *oci* variant: exactly two layers, the first
///    `WASM_LAYER` one is the raw module.
///
/// In 1 and 2 the layer is gunzipped and the first tar entry whose base
/// name (Go `filepath.Base`) is `plugin.wasm` is the module
/// (`extractWasmPluginBinary`). An index is not judged here: go-containerregistry's
/// `remote.Descriptor.Image` would pick its linux/amd64 manifest.
fn fetch_plugin(
    manifest: &Value,
    blob: &mut dyn FnMut(&Value) -> Result<Vec<u8>, String>,
) -> Result<(Variant, Vec<u8>), String> {
    let media_type = manifest["mediaType"].as_str().unwrap_or_default();
    if media_type.contains("index") || media_type.contains("manifest.list") {
        return Err(format!("{media_type} is an index, not an image manifest"));
    }
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let (variant, wasm) = if media_type == DOCKER_MANIFEST {
        let wasm = last_layer_plugin(&layers, DOCKER_LAYER, blob)
            .map_err(|e| format!("could not extract Wasm file from the image as Docker container {e}"))?;
        (Variant::Docker, wasm)
    } else {
        match last_layer_plugin(&layers, OCI_LAYER, blob) {
            Ok(wasm) => (Variant::Compat, wasm),
            Err(compat) => match oci_artifact_plugin(&layers, blob) {
                Ok(wasm) => (Variant::Oci, wasm),
                Err(oci) => {
                    return Err(format!(
                        "the given image is in invalid format as an OCI image: \
                         could not parse as compat variant: {compat}; could not parse as oci variant: {oci}"
                    ))
                }
            },
        }
    };
    // cache.go: isValidWasmBinary, `len(in) >= 8 && in[:4] == "\0asm"`.
    if wasm.len() < 8 || !wasm.starts_with(b"\0asm") {
        return Err("fetched Wasm binary is invalid (no \\0asm header)".into());
    }
    Ok((variant, wasm))
}

/// `extractDockerImage` / `extractOCIStandardImage`: the last layer, of
/// `want` media type, holding `plugin.wasm`.
fn last_layer_plugin(
    layers: &[Value],
    want: &str,
    blob: &mut dyn FnMut(&Value) -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    let layer = layers.last().ok_or("number of layers must be greater than zero")?;
    let media_type = layer["mediaType"].as_str().unwrap_or_default();
    if media_type != want {
        return Err(format!("invalid media type {media_type} (expect {want})"));
    }
    let tar = gunzip(&blob(layer)?).map_err(|e| format!("failed to parse layer as tar.gz: {e}"))?;
    // extractWasmPluginBinary: the first entry named */plugin.wasm.
    let entries = tar_entries(&tar)?;
    let plugin = entries.into_iter().find(|e| go_base(&e.name) == "plugin.wasm");
    plugin.map(|e| e.data).ok_or_else(|| "could not extract wasm binary: plugin.wasm not found in the archive".into())
}

/// `extractOCIArtifactImage`: two layers, one of them the raw module.
fn oci_artifact_plugin(
    layers: &[Value],
    blob: &mut dyn FnMut(&Value) -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    if layers.len() != 2 {
        return Err(format!("number of layers must be 2 but got {}", layers.len()));
    }
    let layer = layers.iter().find(|l| l["mediaType"] == WASM_LAYER);
    let layer = layer.ok_or_else(|| format!("could not find the layer of type {WASM_LAYER}"))?;
    let wasm = blob(layer)?;
    if wasm.len() > MAX_WASM {
        return Err(format!("wasm layer size exceeds maximum size {MAX_WASM}"));
    }
    Ok(wasm)
}

/// Go's `filepath.Base` on a tar name: the last element, trailing slashes
/// dropped.
fn go_base(name: &str) -> &str {
    let trimmed = name.trim_end_matches('/');
    trimmed.rsplit('/').next().unwrap_or(trimmed)
}

/// `gzip -dc` of `data` (multi-member, as Go's gzip.Reader), at most
/// [`MAX_WASM`] bytes out (the fetchers' `io.LimitReader`).
fn gunzip(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new("gzip")
        .args(["-d", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("gzip: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("gzip: no stdin")?;
    // Written from another thread: gzip's output would fill its pipe first.
    let output = std::thread::scope(|s| {
        s.spawn(move || stdin.write_all(data));
        child.wait_with_output()
    })
    .map_err(|e| format!("gzip: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
    }
    if output.stdout.len() > MAX_WASM {
        return Err(format!("more than {MAX_WASM} bytes uncompressed"));
    }
    Ok(output.stdout)
}

/// One entry of a tar archive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TarEntry {
    name: String,
    /// The type flag: `b'0'` a regular file, `b'5'` a directory, …
    kind: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    data: Vec<u8>,
}

/// The entries of a ustar/v7 archive, checksums verified, up to the first
/// zero block (as Go's `archive/tar` reads it). Stricter than Go: pax and
/// GNU extension headers are refused rather than applied (scripts/image
/// writes none; an image that needs them is not one this test accepts).
fn tar_entries(tar: &[u8]) -> Result<Vec<TarEntry>, String> {
    let octal = |field: &[u8], what: &str| -> Result<u64, String> {
        let text = String::from_utf8_lossy(field);
        let text = text.trim_matches(|c| c == '\0' || c == ' ');
        if text.is_empty() {
            return Ok(0);
        }
        u64::from_str_radix(text, 8).map_err(|_| format!("tar header: bad {what} field {text:?}"))
    };
    let cstr = |field: &[u8]| {
        let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
        String::from_utf8_lossy(&field[..end]).into_owned()
    };
    let mut entries = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() {
        let header = &tar[at..at + 512];
        if header.iter().all(|b| *b == 0) {
            return Ok(entries);
        }
        let sum: u64 =
            header.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { u64::from(*b) }).sum();
        if octal(&header[148..156], "checksum")? != sum {
            return Err(format!("tar header at {at}: checksum mismatch"));
        }
        let kind = header[156];
        if matches!(kind, b'x' | b'g' | b'L' | b'K') {
            return Err(format!("tar header at {at}: extension header {:?} not handled here", kind as char));
        }
        let mut name = cstr(&header[0..100]);
        if &header[257..262] == b"ustar" {
            let prefix = cstr(&header[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let size = usize::try_from(octal(&header[124..136], "size")?).map_err(|e| e.to_string())?;
        let start = at + 512;
        let data = tar.get(start..start + size).ok_or_else(|| format!("tar entry {name}: truncated"))?.to_vec();
        entries.push(TarEntry {
            name,
            kind: if kind == 0 { b'0' } else { kind },
            mode: u32::try_from(octal(&header[100..108], "mode")?).unwrap_or(u32::MAX),
            uid: u32::try_from(octal(&header[108..116], "uid")?).unwrap_or(u32::MAX),
            gid: u32::try_from(octal(&header[116..124], "gid")?).unwrap_or(u32::MAX),
            mtime: octal(&header[136..148], "mtime")?,
            data,
        });
        at = start + size.div_ceil(512) * 512;
    }
    Err("tar archive without its end-of-archive block".into())
}

// ---- a scratch directory, scripts/image, skopeo ----------------------------------

/// A fresh temporary directory, removed on drop unless a test failed.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let run = RUNS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("keyswap-{what}-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `command` to completion (each of these is bounded: no network but
/// loopback), panicking with its output if it fails; returns its stdout.
fn run(command: &mut Command) -> String {
    let output = command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{command:?} failed ({}):\n{stdout}\n{stderr}", output.status);
    stdout.into_owned()
}

/// `scripts/image --tag TAG --out OUT --wasm <the filter> [extra]`, its
/// `name: value` lines.
fn scripts_image(tag: &str, out: &Path, extra: &[&str]) -> BTreeMap<String, String> {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let stdout = run(Command::new(repo_root().join("scripts/image"))
        .args(["--tag", tag, "--out"])
        .arg(out)
        .arg("--wasm")
        .arg(&wasm)
        .args(extra));
    stdout
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// `skopeo copy --dest-tls-verify=false oci:LAYOUT:TAG docker://REGISTRY/REPOSITORY:TAG`,
/// as the docs push (plain HTTP: the registry is loopback).
fn skopeo_push(layout: &Path, tag: &str, registry: &Registry) {
    let source = format!("oci:{}:{tag}", layout.display());
    let destination = format!("docker://{}/{REPOSITORY}:{tag}", registry.addr);
    run(Command::new("skopeo").args(["copy", "--dest-tls-verify=false", &source, &destination]));
}

// ---- a real registry --------------------------------------------------------------

/// Debian's `docker-registry` (distribution 2.8) on a loopback port,
/// storing in a scratch directory; killed on drop.
struct Registry {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Registry {
    /// Starts it and waits (bounded) until `GET /v2/` answers 200.
    fn start(dir: &Path) -> Self {
        let binary = Path::new("/usr/bin/docker-registry");
        assert!(binary.is_file(), "no {}: run scripts/setup (it installs docker-registry)", binary.display());
        // A port free a moment ago may be taken by the time the registry
        // binds it: then it exits, and another port is tried.
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port().unwrap_or_else(|e| panic!("{e}"));
            let config = dir.join(format!("registry-{attempt}.yml"));
            let storage = dir.join("storage");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    storage.display()
                ),
            )
            .expect("write the registry's config");
            let log = dir.join(format!("registry-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("the registry's log");
            let child = Command::new(binary)
                .arg("serve")
                .arg(&config)
                .env_clear()
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("the registry's log"))
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
            // From here on, dropping `registry` kills it.
            let mut registry = Self { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), log };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = registry.child.try_wait() {
                    last = format!("docker-registry exited ({status}):\n{}", registry.log_text());
                    break;
                }
                if registry.get("/v2/", "application/json").is_ok_and(|r| r.status == 200) {
                    return registry;
                }
                assert!(Instant::now() < deadline, "docker-registry did not answer /v2/:\n{}", registry.log_text());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("docker-registry did not start on any port: {last}");
    }

    fn log_text(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    fn get(&self, path: &str, accept: &str) -> std::io::Result<Response> {
        Request::get(path)
            .header("host", self.addr.to_string())
            .header("accept", accept)
            .header("connection", "close")
            .send(self.addr)
    }

    /// The manifest of `REPOSITORY:reference` as go-containerregistry's
    /// `remote.Get` asks for it (image manifests and indexes, OCI and
    /// Docker): its digest (`Docker-Content-Digest`, checked against the
    /// bytes) and the manifest.
    fn manifest(&self, reference: &str) -> (String, Value) {
        let accept = [
            OCI_MANIFEST,
            DOCKER_MANIFEST,
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ]
        .join(", ");
        let path = format!("/v2/{REPOSITORY}/manifests/{reference}");
        let response = self.get(&path, &accept).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(response.status, 200, "GET {path}: {}", response.text());
        let digest = format!("sha256:{}", sha256_hex(&response.body));
        assert_eq!(response.header("docker-content-digest"), Some(digest.as_str()), "the manifest's digest");
        let manifest = response.json().unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"));
        assert_eq!(response.header("content-type"), manifest["mediaType"].as_str(), "served as its own media type");
        (digest, manifest)
    }

    /// The blob of a descriptor, checked against its digest and size.
    fn blob(&self, descriptor: &Value) -> Result<Vec<u8>, String> {
        let digest =
            descriptor["digest"].as_str().ok_or_else(|| format!("a descriptor without digest: {descriptor}"))?;
        let path = format!("/v2/{REPOSITORY}/blobs/{digest}");
        let response = self.get(&path, "*/*").map_err(|e| format!("GET {path}: {e}"))?;
        if response.status != 200 {
            return Err(format!("GET {path}: {} {}", response.status, response.text()));
        }
        if format!("sha256:{}", sha256_hex(&response.body)) != digest {
            return Err(format!("GET {path}: the bytes do not hash to {digest}"));
        }
        if descriptor["size"].as_u64() != Some(response.body.len() as u64) {
            return Err(format!(
                "GET {path}: {} bytes, the descriptor says {}",
                response.body.len(),
                descriptor["size"]
            ));
        }
        Ok(response.body)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- docker-registry log {}\n{}", self.log.display(), self.log_text());
        }
    }
}

// ---- the image tests ------------------------------------------------------------

/// `scripts/image` builds the compat form; pushed with skopeo to a real
/// registry and pulled back, it is exactly what the fetchers' rules
/// require, and it yields the filter byte for byte.
#[test]
fn the_plugin_image_pushed_to_a_registry_is_what_istio_and_envoy_gateway_load() {
    let wasm = std::fs::read(filter_wasm().unwrap_or_else(|e| panic!("{e}"))).expect("the filter");
    let scratch = Scratch::new("image");
    let layout = scratch.0.join("layout");
    let tag = "0.1.0-test";
    let printed = scripts_image(tag, &layout, &[]);
    assert_eq!(printed.get("layout").map(PathBuf::from), Some(layout.canonicalize().expect("the layout")));
    assert_eq!(printed.get("tag").map(String::as_str), Some(tag));
    assert_eq!(printed["wasm_sha256"], sha256_hex(&wasm), "the printed sha256 is the raw module's");
    let digest = printed["manifest"].clone();

    // The layout: index.json names the manifest under the tag.
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
        .expect("index.json is JSON");
    assert_eq!(index["manifests"].as_array().map(Vec::len), Some(1), "{index}");
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    assert_eq!(index["manifests"][0]["mediaType"], OCI_MANIFEST);
    assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], tag);

    let registry = Registry::start(&scratch.0);
    skopeo_push(&layout, tag, &registry);
    let (pulled, manifest) = registry.manifest(tag);
    assert_eq!(pulled, digest, "the registry serves the manifest scripts/image printed (skopeo converted nothing)");

    // The image exactly: an OCI manifest, one gzip layer, a valid config.
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    assert_eq!(layers[0]["mediaType"], OCI_LAYER);
    assert_eq!(manifest["config"]["mediaType"], OCI_CONFIG);
    let config: Value =
        serde_json::from_slice(&registry.blob(&manifest["config"]).unwrap_or_else(|e| panic!("{e}"))).expect("JSON");
    let layer = registry.blob(&layers[0]).unwrap_or_else(|e| panic!("{e}"));
    let tar = gunzip(&layer).unwrap_or_else(|e| panic!("the layer is gzip: {e}"));
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(config["rootfs"]["diff_ids"], json!([format!("sha256:{}", sha256_hex(&tar))]), "{config}");
    assert!(config["architecture"].is_string() && config["os"].is_string(), "OCI requires both: {config}");
    // Exactly plugin.wasm, a regular file, owner and time fixed.
    let entries = tar_entries(&tar).unwrap_or_else(|e| panic!("{e}"));
    let shape: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind, e.mode, e.uid, e.gid, e.mtime)).collect();
    assert_eq!(shape, [("plugin.wasm", b'0', 0o644, 0, 0, 0)]);

    // The fetchers' rules, on what the registry serves.
    let (variant, module) = fetch_plugin(&manifest, &mut |d| registry.blob(d)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(variant, Variant::Compat);
    assert!(module == wasm, "the image yields the filter byte for byte ({} vs {} bytes)", module.len(), wasm.len());

    // Deterministic: another build, another tag, pushed by scripts/image
    // itself, is the same manifest.
    let again = scratch.0.join("again");
    let destination = format!("{}/{REPOSITORY}:pushed", registry.addr);
    let printed = scripts_image("pushed", &again, &["--push", &destination, "--", "--dest-tls-verify=false"]);
    assert_eq!(printed["manifest"], digest, "the same module gives the same manifest digest");
    assert_eq!(printed["pushed"], format!("{destination}@{digest}"));
    assert_eq!(registry.manifest("pushed").0, digest);
}

/// The negative: the artifact the old README's `oras push … :application/vnd.module.wasm.content.layer.v1+wasm`
/// made (one raw-wasm layer; what oras 1.x writes: an OCI manifest with an
/// `artifactType` and the empty config), pushed the same way, is refused by
/// the same rules, for both reasons the fetchers give.
#[test]
fn the_old_one_layer_raw_wasm_artifact_is_refused_by_the_same_rules() {
    let wasm = std::fs::read(filter_wasm().unwrap_or_else(|e| panic!("{e}"))).expect("the filter");
    let scratch = Scratch::new("image-oras");
    let layout = scratch.0.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("a layout");
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).expect("a blob");
        json!({"digest": format!("sha256:{hex}"), "size": bytes.len()})
    };
    let mut layer = put(&wasm);
    layer["mediaType"] = WASM_LAYER.into();
    layer["annotations"] = json!({"org.opencontainers.image.title": "keyswap_filter.wasm"});
    let mut config = put(b"{}");
    config["mediaType"] = "application/vnd.oci.empty.v1+json".into();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.unknown.artifact.v1",
        "config": config,
        "layers": [layer],
    })
    .to_string();
    let mut descriptor = put(manifest.as_bytes());
    descriptor["mediaType"] = OCI_MANIFEST.into();
    descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": "raw-wasm"});
    let index = json!({"schemaVersion": 2, "manifests": [descriptor]});
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");

    let registry = Registry::start(&scratch.0);
    skopeo_push(&layout, "raw-wasm", &registry);
    let (digest, pulled) = registry.manifest("raw-wasm");
    assert_eq!(digest, descriptor["digest"], "pushed as written");
    // It is in the registry, whole: only the rules refuse it.
    assert_eq!(registry.blob(&pulled["layers"][0]).as_deref(), Ok(wasm.as_slice()));
    let refusal = fetch_plugin(&pulled, &mut |d| registry.blob(d)).map(|(v, _)| v).expect_err("refused");
    for reason in [
        format!("could not parse as compat variant: invalid media type {WASM_LAYER} (expect {OCI_LAYER})"),
        "could not parse as oci variant: number of layers must be 2 but got 1".to_string(),
    ] {
        assert!(refusal.contains(&reason), "{reason:?} not in {refusal:?}");
    }
}

// ---- Envoy fetching the module over HTTP -----------------------------------------

/// A loopback server answering every request with the module (as Envoy
/// Gateway's own wasm HTTP server serves modules to its proxies); counts
/// what it served; stops on drop.
struct ModuleServer {
    server: Server,
    served: Arc<AtomicUsize>,
}

impl ModuleServer {
    fn start(module: Vec<u8>) -> Self {
        let served = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&served);
        let server = Server::start("127.0.0.1:0", move |_| {
            count.fetch_add(1, Ordering::SeqCst);
            Reply {
                status: 200,
                headers: vec![("content-type".into(), "application/wasm".into())],
                body: module.clone(),
            }
        })
        .expect("a loopback port");
        Self { server, served }
    }

    fn url(&self) -> String {
        format!("http://{}/keyswap_filter.wasm", self.server.addr())
    }
}

/// The cluster Envoy fetches the module through.
const MODULE_CLUSTER: &str = "keyswap_module";

/// A [`gateway`] bootstrap whose every keyswap filter (the listener's and
/// each cluster's) loads the module from `server` through
/// `vm_config.code.remote` with `sha256`, through [`MODULE_CLUSTER`].
fn remote_gateway(listener: &Listener, upstream: SocketAddr, server: &ModuleServer, sha256: &str) -> String {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let mut bootstrap = gateway(std::slice::from_ref(listener), upstream, &wasm);
    // The retries matter: Envoy 1.40 starts the fetch of a static
    // listener's filter before its static clusters exist (`no cluster`).
    let code = json!({"remote": {
        "http_uri": {"uri": server.url(), "cluster": MODULE_CLUSTER, "timeout": "10s"},
        "sha256": sha256,
        "retry_policy": {"num_retries": 5, "retry_back_off": {"base_interval": "0.2s", "max_interval": "1s"}},
    }});
    fn remote(value: &mut Value, code: &Value, count: &mut usize) {
        match value {
            Value::Object(map) => {
                if let Some(vm_config) = map.get_mut("vm_config") {
                    vm_config["code"] = code.clone();
                    *count += 1;
                }
                map.values_mut().for_each(|v| remote(v, code, count));
            }
            Value::Array(list) => list.iter_mut().for_each(|v| remote(v, code, count)),
            _ => {}
        }
    }
    let mut count = 0;
    remote(&mut bootstrap, &code, &mut count);
    assert_eq!(count, 1 + listener.clusters().len(), "the listener's filter and every cluster's load remotely");
    let clusters = bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters");
    clusters.push(json!({
        "name": MODULE_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": MODULE_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": server.server.addr().ip().to_string(), "port_value": server.server.addr().port()}}}}]}]},
    }));
    bootstrap.to_string()
}

/// One listener, route `remote` bound to its cluster `remote`; key `k`,
/// credential `TOKEN` from the VM's environment.
fn remote_listener() -> Listener {
    Listener {
        name: "remote".into(),
        config: r#"{"clients": [{"id": "c", "key": "k", "routes": ["*"]}],
 "routes": [{"name": "remote", "match": {"route_name": "remote", "clusters": ["remote"]},
  "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"env": "TOKEN"}}]}]}"#
            .into(),
        env: BTreeMap::from([("TOKEN".to_string(), "remote-credential".to_string())]),
        route_names: vec!["remote".into()],
        ..Listener::default()
    }
}

fn send(envoy: &Envoy, key: Option<&str>) -> Response {
    let mut request = Request::get("/x").header("host", "gw").header(ROUTE_HEADER, "remote");
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    request.send(envoy.listener("remote").expect("the listener")).expect("a response")
}

/// Envoy's counter `name` from the admin's `/stats`.
fn counter(envoy: &Envoy, name: &str) -> Option<u64> {
    let response = Request::get("/stats").header("host", "admin").send(envoy.admin()).expect("/stats");
    let text = response.text();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.trim().parse().ok())
}

/// An Envoy whose keyswap comes from a [`ModuleServer`], in front of an echo.
struct RemoteGateway {
    envoy: Envoy,
    server: ModuleServer,
    _echo: Echo,
}

/// Starts a [`remote_gateway`] with the module's own sha256, or a wrong one
/// (its first digit changed). With the right one, Envoy counts as started
/// once the filter logged `configuration loaded`; with a wrong one, once
/// ready (no configuration can load).
fn start_remote(right_sha256: bool) -> RemoteGateway {
    let wasm = std::fs::read(filter_wasm().unwrap_or_else(|e| panic!("{e}"))).expect("the filter");
    let mut sha256 = sha256_hex(&wasm);
    if !right_sha256 {
        sha256.replace_range(..1, if sha256.starts_with('0') { "1" } else { "0" });
    }
    let server = ModuleServer::start(wasm);
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let listener = remote_listener();
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: remote_gateway(&listener, echo.addr(), &server, &sha256),
        expect_configs: if right_sha256 { vec![listener.config.clone()] } else { Vec::new() },
        ..Launch::default()
    };
    let envoy = Envoy::start(&launch).unwrap_or_else(|e| panic!("Envoy starts (sha256 right: {right_sha256}): {e}"));
    RemoteGateway { envoy, server, _echo: echo }
}

/// Plain Envoy loads keyswap from an http URL and the module's sha256 (the
/// form Envoy Gateway gives its proxies, and `scripts/image` prints the
/// sha256 for), in both stages: the listener's filter denies a missing
/// key, the cluster's injects the credential.
#[test]
fn envoy_loads_keyswap_from_an_http_uri_with_the_module_sha256() {
    let RemoteGateway { envoy, server, _echo } = start_remote(true); // the echo lives to the end
    assert!(server.served.load(Ordering::SeqCst) >= 1, "Envoy fetched the module from the server");
    assert!(counter(&envoy, "wasm.remote_load_fetch_successes").is_some_and(|n| n >= 1));

    let missing = send(&envoy, None);
    assert_eq!(missing.status, 401, "{}", missing.text());
    assert_eq!(missing.json().expect("keyswap's JSON denial")["error"], "missing_key");
    let allowed = send(&envoy, Some("k"));
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    let seen = Echoed::parse(&allowed.body).expect("the echo upstream answered");
    assert_eq!(seen.header_all("authorization"), ["Bearer remote-credential"], "the final stage injected");
    assert_eq!(seen.header("x-api-key"), None, "the first stage removed the key");
}

/// A wrong sha256: Envoy 1.40 fetches the module, finds the digest wrong
/// (`data is invalid`), retries, gives up, and the plugin fails to load.
/// It still starts and serves the listener, and the filter fails closed:
/// every request is answered 503 (`wasm_fail_stream`) with an empty body
/// and nothing reaches the upstream. Never a pass-through.
#[test]
fn envoy_with_a_wrong_module_sha256_fails_closed() {
    let RemoteGateway { envoy, server, _echo } = start_remote(false); // the echo lives to the end
                                                                      // Ready comes after the fetches gave up; polled anyway, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&envoy, "wasm.remote_load_fetch_failures").unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no failed fetch counted:\n{}", tail(&envoy.log(), 80));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.served.load(Ordering::SeqCst) >= 1, "Envoy did fetch the module (and refused its digest)");

    for key in [None, Some("k"), Some("wrong")] {
        let response = send(&envoy, key);
        assert_eq!((response.status, response.text().as_str()), (503, ""), "key {key:?}");
    }
    let log = envoy.log();
    assert!(log.contains("data is invalid"), "Envoy says the fetched data failed its check");
    assert!(log.contains("Plugin configured to fail closed failed to load"), "{}", tail(&log, 60));
    assert!(log.contains("Preparing local reply with details wasm_fail_stream"), "{}", tail(&log, 60));
    assert!(!log.contains("keyswap: configuration loaded"), "the module must not have run");
    assert_eq!(counter(&envoy, "wasm.remote_load_fetch_successes"), Some(0));
    assert_eq!(counter(&envoy, "cluster.remote.upstream_rq_total"), Some(0), "nothing reached the upstream");
}
