//! The keyswap filter's configuration as an Envoy ECDS resource, and what
//! Envoy's admin says about it. Pure apart from [`write_atomically`] and
//! [`lock`] (the file and its push lock); `keyswap push` and the
//! end-to-end tests both use it, so they write the same bytes the same way.
//!
//! The file Envoy watches (`config_discovery.config_source.path_config_source`
//! in `envoy.yaml`) holds one `DiscoveryResponse`:
//!
//! ```json
//! {"version_info": "3fee922bc314",
//!  "resources": [{"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
//!    "name": "keyswap",
//!    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
//!      "config": {"name": "keyswap",
//!        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "<the keyswap JSON>"},
//!        "vm_config": {…}}}}]}
//! ```
//!
//! `version_info` is [`keyswap_policy::content_version`] of the keyswap
//! JSON: the version the filter logs when it loads it and shows in
//! `keyswap_config_info`, so one version names a configuration everywhere.
//!
//! The same `DiscoveryResponse` is written as binary protobuf when the
//! file's name ends in `.pb` ([`Format`]; `envoy.yaml` uses
//! `.run/ecds/keyswap.pb`): Envoy picks the parser by the name
//! (`MessageUtil::loadFromFile` in `source/common/protobuf/utility.cc`),
//! and a binary resource of 100,000 clients parses in tens of
//! milliseconds where its JSON takes hundreds (docs/performance.md,
//! "Revocation"). [`encode`] writes either; [`read_resource`] reads either.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use prost::Message as _;
use serde_json::{json, Value};

use crate::proto;

/// The ECDS resource's name: the `name` of the HTTP filter in `envoy.yaml`
/// (and so of its `extension_config_discovery.http_filter.<name>.*` stats).
pub const RESOURCE_NAME: &str = "keyswap";

/// The type of the resource Envoy is told to accept (`type_urls`).
pub const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

const EXTENSION_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const STRING_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// The filter's `vm_config` when the ECDS file holds none yet: the same as
/// `envoy.yaml`'s `default_config`, so the pushed configuration runs in the
/// VM Envoy already started (a test holds the two equal).
pub fn default_vm_config() -> Value {
    json!({
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": "target/wasm32-wasip1/release/keyswap_filter.wasm"}},
        "environment_variables": {
            "host_env_keys": ["KEYSWAP_DEMO_CREDENTIAL", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GITHUB_TOKEN"]
        },
    })
}

/// The `DiscoveryResponse` carrying `config` (the keyswap JSON, byte for
/// byte) in a Wasm filter with `vm_config`, versioned by its content.
pub fn resource(config: &str, vm_config: &Value) -> Value {
    json!({
        "version_info": keyswap_policy::content_version(config.as_bytes()),
        "resources": [{
            "@type": EXTENSION_TYPE,
            "name": RESOURCE_NAME,
            "typed_config": {
                "@type": WASM_TYPE,
                "config": {
                    "name": RESOURCE_NAME,
                    "configuration": {"@type": STRING_TYPE, "value": config},
                    "vm_config": vm_config,
                },
            },
        }],
    })
}

/// The file's bytes for [`resource`]: pretty JSON and a final newline.
pub fn resource_bytes(config: &str, vm_config: &Value) -> Vec<u8> {
    let mut text = serde_json::to_string_pretty(&resource(config, vm_config)).unwrap_or_default();
    text.push('\n');
    text.into_bytes()
}

/// How an ECDS file is encoded, as Envoy decides it: by the file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON (any name but those below; `.yaml`/`.yml` too, JSON being YAML).
    Json,
    /// Binary protobuf: a name ending in `.pb` (any case).
    Binary,
}

impl Format {
    /// The format Envoy reads `path` in.
    ///
    /// # Errors
    /// A `.pb_text` name: Envoy reads it as text protobuf, which keyswap
    /// does not write.
    pub fn of(path: &Path) -> Result<Self, String> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if name.ends_with(".pb") {
            Ok(Self::Binary)
        } else if name.ends_with(".pb_text") {
            Err(format!(
                "{}: Envoy reads a .pb_text file as text protobuf, which keyswap does not write; name the ECDS file \
                 .pb (binary, fastest) or .json",
                path.display()
            ))
        } else {
            Ok(Self::Json)
        }
    }

    /// `JSON` or `binary protobuf`, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::Binary => "binary protobuf",
        }
    }
}

/// The keyswap filter's `vm_config` as an ECDS file holds it: a JSON
/// object, or (binary file) the encoded `VmConfig` message, kept byte for
/// byte.
#[derive(Debug, Clone, PartialEq)]
pub enum VmConfig {
    Json(Value),
    Binary(Vec<u8>),
}

impl VmConfig {
    /// As JSON (a binary one decoded).
    ///
    /// # Errors
    /// A binary `vm_config` with fields this converter does not know
    /// (`code.remote`, `configuration`, …): it would lose them.
    pub fn to_json(&self) -> Result<Value, String> {
        match self {
            Self::Json(value) => Ok(value.clone()),
            Self::Binary(bytes) => vm_config_to_json(bytes),
        }
    }

    /// As the encoded `VmConfig` message (a JSON one converted).
    ///
    /// # Errors
    /// A JSON `vm_config` with a field the converter does not know, or a
    /// value of the wrong type; the message names the field.
    pub fn to_binary(&self) -> Result<Vec<u8>, String> {
        match self {
            Self::Json(value) => vm_config_to_binary(value),
            Self::Binary(bytes) => Ok(bytes.clone()),
        }
    }
}

/// The ECDS file's bytes in `format` for `config` (the keyswap JSON, byte
/// for byte) with `vm_config`, versioned by the configuration's content.
/// Binary files are encoded deterministically: the same inputs give the
/// same bytes (so `push` can tell an unchanged file).
///
/// # Errors
/// `vm_config` cannot be converted to `format` ([`VmConfig`]).
pub fn encode(format: Format, config: &str, vm_config: &VmConfig) -> Result<Vec<u8>, String> {
    match format {
        Format::Json => Ok(resource_bytes(config, &vm_config.to_json()?)),
        Format::Binary => Ok(binary_resource(config, vm_config.to_binary()?)),
    }
}

fn binary_resource(config: &str, vm_config: Vec<u8>) -> Vec<u8> {
    let any = |type_url: &str, value: Vec<u8>| proto::Any { type_url: type_url.to_string(), value };
    let wasm = proto::Wasm {
        config: Some(proto::PluginConfig {
            name: RESOURCE_NAME.to_string(),
            vm_config: Some(vm_config),
            configuration: Some(any(STRING_TYPE, proto::StringValue { value: config.to_string() }.encode_to_vec())),
        }),
    };
    let extension = proto::TypedExtensionConfig {
        name: RESOURCE_NAME.to_string(),
        typed_config: Some(any(WASM_TYPE, wasm.encode_to_vec())),
    };
    proto::DiscoveryResponse {
        version_info: keyswap_policy::content_version(config.as_bytes()),
        resources: vec![any(EXTENSION_TYPE, extension.encode_to_vec())],
    }
    .encode_to_vec()
}

/// What an ECDS file holds, read from either encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The encoding the bytes were read in.
    pub format: Format,
    /// `version_info`, if not empty.
    pub version: Option<String>,
    /// The keyswap JSON, if the resource carries a `StringValue`.
    pub configuration: Option<String>,
    /// The resource's `vm_config`, if it has one.
    pub vm_config: Option<VmConfig>,
}

/// Reads an ECDS file's bytes: a `DiscoveryResponse` (or a single
/// `TypedExtensionConfig`, JSON only) with a keyswap resource, as JSON or
/// as binary protobuf (whichever parses: binary protobuf never starts
/// like JSON). `None` when neither holds one.
pub fn read_resource(bytes: &[u8]) -> Option<Held> {
    if let Ok(response) = serde_json::from_slice::<Value>(bytes) {
        wasm_config(&response)?;
        return Some(Held {
            format: Format::Json,
            version: response.get("version_info").and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_string),
            configuration: configuration_of(&response).map(str::to_string),
            vm_config: vm_config_of(&response).map(VmConfig::Json),
        });
    }
    let response = proto::DiscoveryResponse::decode(bytes).ok()?;
    let plugin = response.resources.iter().find_map(|any| {
        let extension = (any.type_url == EXTENSION_TYPE)
            .then(|| proto::TypedExtensionConfig::decode(any.value.as_slice()).ok())
            .flatten()?;
        let typed = extension.typed_config.filter(|_| extension.name == RESOURCE_NAME)?;
        (typed.type_url == WASM_TYPE).then(|| proto::Wasm::decode(typed.value.as_slice()).ok()).flatten()?.config
    })?;
    let configuration = plugin
        .configuration
        .filter(|any| any.type_url == STRING_TYPE)
        .and_then(|any| proto::StringValue::decode(any.value.as_slice()).ok())
        .map(|s| s.value);
    Some(Held {
        format: Format::Binary,
        version: Some(response.version_info).filter(|v| !v.is_empty()),
        configuration,
        vm_config: plugin.vm_config.map(VmConfig::Binary),
    })
}

/// A JSON `vm_config` as an encoded `VmConfig` message.
fn vm_config_to_binary(value: &Value) -> Result<Vec<u8>, String> {
    fn object<'a>(value: &'a Value, at: &str) -> Result<&'a serde_json::Map<String, Value>, String> {
        value.as_object().ok_or_else(|| format!("{at}: not an object"))
    }
    fn string(value: &Value, at: &str) -> Result<String, String> {
        value.as_str().map(str::to_string).ok_or_else(|| format!("{at}: not a string"))
    }
    fn boolean(value: &Value, at: &str) -> Result<bool, String> {
        value.as_bool().ok_or_else(|| format!("{at}: not true or false"))
    }
    let unknown = |at: &str| {
        Err(format!(
            "{at}: keyswap cannot write it in a binary (.pb) ECDS file (it converts vm_id, runtime, \
             code.local, allow_precompiled, nack_on_code_cache_miss and environment_variables); use a .json \
             ECDS file for this vm_config"
        ))
    };
    let mut vm = proto::VmConfig::default();
    for (key, inner) in object(value, "vm_config")? {
        let at = format!("vm_config.{key}");
        match key.as_str() {
            "vm_id" => vm.vm_id = string(inner, &at)?,
            "runtime" => vm.runtime = string(inner, &at)?,
            "allow_precompiled" => vm.allow_precompiled = boolean(inner, &at)?,
            "nack_on_code_cache_miss" => vm.nack_on_code_cache_miss = boolean(inner, &at)?,
            "code" => {
                let mut code = proto::AsyncDataSource::default();
                for (key, inner) in object(inner, &at)? {
                    let at = format!("{at}.{key}");
                    if key != "local" {
                        return unknown(&at);
                    }
                    let mut local = proto::DataSource::default();
                    for (key, inner) in object(inner, &at)? {
                        let at = format!("{at}.{key}");
                        match key.as_str() {
                            "filename" => local.filename = Some(string(inner, &at)?),
                            "inline_string" => local.inline_string = Some(string(inner, &at)?),
                            "environment_variable" => local.environment_variable = Some(string(inner, &at)?),
                            "inline_bytes" => {
                                use base64::Engine as _;
                                let text = string(inner, &at)?;
                                let bytes = base64::engine::general_purpose::STANDARD
                                    .decode(text)
                                    .map_err(|e| format!("{at}: not base64: {e}"))?;
                                local.inline_bytes = Some(bytes);
                            }
                            _ => return unknown(&at),
                        }
                    }
                    code.local = Some(local);
                }
                vm.code = Some(code);
            }
            "environment_variables" => {
                let mut env = proto::EnvironmentVariables::default();
                for (key, inner) in object(inner, &at)? {
                    let at = format!("{at}.{key}");
                    match key.as_str() {
                        "host_env_keys" => {
                            let list = inner.as_array().ok_or_else(|| format!("{at}: not a list"))?;
                            env.host_env_keys = list.iter().map(|v| string(v, &at)).collect::<Result<_, _>>()?;
                        }
                        "key_values" => {
                            for (name, v) in object(inner, &at)? {
                                env.key_values.insert(name.clone(), string(v, &format!("{at}.{name}"))?);
                            }
                        }
                        _ => return unknown(&at),
                    }
                }
                vm.environment_variables = Some(env);
            }
            _ => return unknown(&at),
        }
    }
    Ok(vm.encode_to_vec())
}

/// An encoded `VmConfig` message as JSON, if it holds only the fields
/// [`vm_config_to_binary`] writes (checked by encoding it again).
fn vm_config_to_json(bytes: &[u8]) -> Result<Value, String> {
    let vm = proto::VmConfig::decode(bytes).map_err(|e| format!("vm_config: not a VmConfig message: {e}"))?;
    if vm.encode_to_vec() != bytes {
        return Err("vm_config: the binary file's vm_config has fields keyswap cannot carry into JSON \
                    (code.remote, configuration, …); keep the .pb ECDS file, or write its vm_config by hand"
            .to_string());
    }
    let mut out = serde_json::Map::new();
    if !vm.vm_id.is_empty() {
        out.insert("vm_id".into(), json!(vm.vm_id));
    }
    if !vm.runtime.is_empty() {
        out.insert("runtime".into(), json!(vm.runtime));
    }
    if let Some(code) = &vm.code {
        let mut local = serde_json::Map::new();
        if let Some(l) = &code.local {
            if let Some(v) = &l.filename {
                local.insert("filename".into(), json!(v));
            }
            if let Some(v) = &l.inline_string {
                local.insert("inline_string".into(), json!(v));
            }
            if let Some(v) = &l.environment_variable {
                local.insert("environment_variable".into(), json!(v));
            }
            if let Some(v) = &l.inline_bytes {
                use base64::Engine as _;
                local.insert("inline_bytes".into(), json!(base64::engine::general_purpose::STANDARD.encode(v)));
            }
        }
        out.insert("code".into(), json!({"local": local}));
    }
    if vm.allow_precompiled {
        out.insert("allow_precompiled".into(), json!(true));
    }
    if vm.nack_on_code_cache_miss {
        out.insert("nack_on_code_cache_miss".into(), json!(true));
    }
    if let Some(env) = &vm.environment_variables {
        let mut e = serde_json::Map::new();
        if !env.host_env_keys.is_empty() {
            e.insert("host_env_keys".into(), json!(env.host_env_keys));
        }
        if !env.key_values.is_empty() {
            e.insert("key_values".into(), json!(env.key_values));
        }
        out.insert("environment_variables".into(), Value::Object(e));
    }
    Ok(Value::Object(out))
}

/// The keyswap filter in a `DiscoveryResponse` (or a single
/// `TypedExtensionConfig`): its Wasm `config` object.
fn wasm_config(response: &Value) -> Option<&Value> {
    let extension = match response.get("resources") {
        Some(resources) => {
            resources.as_array()?.iter().find(|r| r.get("name").and_then(Value::as_str) == Some(RESOURCE_NAME))?
        }
        None => response,
    };
    extension.get("typed_config")?.get("config")
}

/// The `vm_config` of the keyswap filter in a `DiscoveryResponse`, if it
/// holds one: `keyswap push` keeps it, so an operator's VM settings survive
/// pushes.
pub fn vm_config_of(response: &Value) -> Option<Value> {
    wasm_config(response)?.get("vm_config").cloned()
}

/// The keyswap JSON in a `DiscoveryResponse` or `TypedExtensionConfig`.
pub fn configuration_of(response: &Value) -> Option<&str> {
    wasm_config(response)?.get("configuration")?.get("value")?.as_str()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, flushed to disk, renamed over `path`, and the directory
/// flushed too (so a power loss keeps the rename: a revocation is not lost).
/// Envoy watches the directory for files moved into it, so it sees one
/// rename and never a half-written file. Returns the moment the rename was
/// started: a clock read after it could come later than Envoy's reaction on
/// a busy machine.
///
/// The file can hold keys and credentials: it is created 0600 (whatever the
/// umask, whatever the mode of the file it replaces) under a fresh random
/// name with `O_EXCL` (never through a planted link, never another push's
/// temporary file), and keeps the owner and group of the file it replaces
/// (a push as root leaves a file Envoy's user can still read). A symbolic
/// link at `path` is refused: the rename would replace the link itself.
///
/// # Errors
/// `path` is a symbolic link; the replaced file's owner cannot be kept (not
/// root); the directory is missing or not writable. The temporary file is
/// removed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<std::time::SystemTime> {
    use std::os::unix::fs::MetadataExt as _;
    let owner = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => return Err(symlink_error(path)),
        Ok(meta) => Some((meta.uid(), meta.gid())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let dir = parent_dir(path);
    let (temp, mut file) = create_temp(path)?;
    let written = (|| {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            let mine = file.metadata()?;
            if (mine.uid(), mine.gid()) != (uid, gid) {
                if let Err(err) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                    if mine.uid() != uid {
                        return Err(std::io::Error::new(
                            err.kind(),
                            format!(
                                "{} belongs to uid {uid}; this process (uid {}) cannot give the new file that owner \
                                 ({err}), and Envoy may not read a 0600 file it does not own: push as uid {uid} or root",
                                path.display(),
                                mine.uid()
                            ),
                        ));
                    }
                }
            }
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        let renaming = std::time::SystemTime::now();
        std::fs::rename(&temp, path)?;
        Ok(renaming)
    })();
    match written {
        Ok(renaming) => {
            // The rename is in the directory: flush it too.
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(renaming)
        }
        Err(err) => {
            let _ = std::fs::remove_file(&temp);
            Err(err)
        }
    }
}

/// The error for a symbolic link where the ECDS file belongs.
pub fn symlink_error(path: &Path) -> std::io::Error {
    let target = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
    std::io::Error::other(format!(
        "{} is a symbolic link (to {target}): a push renames a new file into place, which would replace the \
         link, and Envoy sees renames only in the directory it watches; give --ecds (and envoy.yaml's \
         path_config_source) the file itself",
        path.display()
    ))
}

/// The directory `path` is in (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `<dir>/.<name>.<suffix>`: a hidden sibling of `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_dir(path).join(format!(".{name}.{suffix}"))
}

/// A new, empty temporary file next to `path`, 0600, under a random name
/// (`.<name>.<32 hex digits>.tmp`), created with `O_EXCL`: two pushes, even
/// with the same PID in two containers sharing the volume, never share one.
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let mut last = None;
    for _ in 0..8 {
        let temp = sibling(path, &format!("{}.tmp", random_hex()));
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}

/// 128 random bits in hex: from the kernel (`/dev/urandom`), else from
/// std's randomly keyed hasher, the clock and a counter.
fn random_hex() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        for half in bytes.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(nanos);
            hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            hasher.write_u32(std::process::id());
            half.copy_from_slice(&hasher.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An exclusive hold on one ECDS file for one push: an advisory `flock` on
/// `<dir>/.<name>.lock` (created 0600, never removed), released when this
/// is dropped or the process ends. Every `keyswap push` to the file takes
/// it, so pushes to one file run one after the other: none can write
/// while another waits for Envoy or restores what it replaced.
#[derive(Debug)]
pub struct Lock {
    _file: std::fs::File,
    /// The lock file.
    pub path: PathBuf,
}

/// Takes the [`Lock`] of the ECDS file `path`, waiting until `deadline`;
/// returns it and how long it waited.
///
/// # Errors
/// The lock file cannot be created or locked, or another push still holds
/// it at `deadline` (`ErrorKind::TimedOut`).
pub fn lock(path: &Path, deadline: std::time::Instant) -> std::io::Result<(Lock, std::time::Duration)> {
    let lock_path = sibling(path, "lock");
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&lock_path)?;
    let start = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok((Lock { _file: file, path: lock_path }, start.elapsed())),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        if std::time::Instant::now() >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("another push holds {} (waited {:?})", lock_path.display(), start.elapsed()),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The `version_info` of an ECDS file's bytes (JSON or binary), if they
/// are a `DiscoveryResponse` with a keyswap resource.
pub fn version_of(bytes: &[u8]) -> Option<String> {
    read_resource(bytes)?.version
}

/// What Envoy's admin says about the keyswap ECDS resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvoyView {
    /// The version Envoy accepted last and runs
    /// (`extension_config_discovery.http_filter.keyswap.version_text`).
    pub accepted: Option<String>,
    /// Updates Envoy rejected so far (`…keyswap.update_rejected`): the
    /// resource parsed, but the filter (or Envoy) refused it.
    pub rejected: u64,
    /// Updates that failed before that (`…keyswap.update_failure`): the
    /// file did not parse as a `DiscoveryResponse`.
    pub failed: u64,
    /// Every read of the file (`…keyswap.update_attempt`): it only grows
    /// while one Envoy runs, so a smaller count means Envoy restarted.
    pub attempts: u64,
    /// The version of the resource in `/config_dump`'s `EcdsConfigDump`.
    /// Envoy 1.40 shows there the resource it last *read* from a file,
    /// refused or not, so this alone does not prove a version active.
    pub dumped: Option<String>,
    /// An `error_state` the dump holds for the resource, if any (Envoy
    /// fills it for some xDS sources; the file source leaves it empty).
    pub dump_error: Option<String>,
}

/// Reads the ECDS stats of [`RESOURCE_NAME`] from `/stats` text.
pub fn parse_stats(text: &str, view: &mut EnvoyView) {
    let prefix = format!("extension_config_discovery.http_filter.{RESOURCE_NAME}.");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else { continue };
        let Some((name, value)) = rest.split_once(": ") else { continue };
        match name {
            "version_text" => {
                let version = value.trim().trim_matches('"');
                view.accepted = (!version.is_empty()).then(|| version.to_string());
            }
            "update_rejected" => view.rejected = value.trim().parse().unwrap_or(0),
            "update_failure" => view.failed = value.trim().parse().unwrap_or(0),
            "update_attempt" => view.attempts = value.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
}

/// Reads the keyswap resource's entry from `/config_dump?resource=ecds_filters`.
pub fn parse_config_dump(dump: &Value, view: &mut EnvoyView) {
    let configs = dump.get("configs").and_then(Value::as_array).into_iter().flatten();
    for config in configs {
        // `?resource=` gives EcdsFilterConfig entries; the full dump nests
        // them in an EcdsConfigDump's `ecds_filters`.
        let entries: Vec<&Value> = match config.get("ecds_filters").and_then(Value::as_array) {
            Some(list) => list.iter().collect(),
            None => vec![config],
        };
        for entry in entries {
            let name = entry.get("ecds_filter").and_then(|f| f.get("name")).and_then(Value::as_str);
            if name != Some(RESOURCE_NAME) {
                continue;
            }
            view.dumped = entry.get("version_info").and_then(Value::as_str).map(str::to_string);
            view.dump_error = entry.get("error_state").map(|e| {
                // Only Envoy's message: the rest of an error state can hold
                // the refused resource, secrets and all.
                e.get("details")
                    .and_then(Value::as_str)
                    .unwrap_or("an error without details (see Envoy's log)")
                    .to_string()
            });
        }
    }
}

/// Names of the VM environment variables a keyswap configuration reads
/// (`{"env": "NAME"}` anywhere in it), sorted, each once.
pub fn env_names(config: &Value) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    match (key.as_str(), inner) {
                        ("env", Value::String(name)) => out.push(name.clone()),
                        _ => walk(inner, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(config, &mut out);
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_carries_the_configuration_byte_for_byte_under_its_content_version() {
        let config = "{\"clients\": []}\n";
        let vm = json!({"runtime": "envoy.wasm.runtime.v8"});
        let response: Value = serde_json::from_slice(&resource_bytes(config, &vm)).unwrap();
        assert_eq!(response["version_info"], keyswap_policy::content_version(config.as_bytes()));
        assert_eq!(configuration_of(&response), Some(config));
        assert_eq!(vm_config_of(&response), Some(vm));
        assert_eq!(response["resources"][0]["typed_config"]["@type"], WASM_TYPE);
    }

    #[test]
    fn a_binary_resource_carries_the_same_configuration_and_keeps_vm_config_bytes() {
        let config = "{\"clients\": []}\n";
        let vm = default_vm_config();
        let bytes = encode(Format::Binary, config, &VmConfig::Json(vm.clone())).unwrap();
        assert!(serde_json::from_slice::<Value>(&bytes).is_err(), "binary, not JSON");
        let held = read_resource(&bytes).unwrap();
        assert_eq!(held.format, Format::Binary);
        assert_eq!(held.version.as_deref(), Some(keyswap_policy::content_version(config.as_bytes()).as_str()));
        assert_eq!(held.configuration.as_deref(), Some(config));
        let kept = held.vm_config.unwrap();
        assert_eq!(kept.to_json().unwrap(), vm, "converted both ways without loss");
        // A push keeps the encoded vm_config byte for byte, and encodes deterministically.
        assert_eq!(encode(Format::Binary, config, &kept).unwrap(), bytes);
        assert_eq!(version_of(&bytes), held.version);
        // And the JSON file of the same configuration reads the same.
        let json = encode(Format::Json, config, &kept).unwrap();
        let held_json = read_resource(&json).unwrap();
        assert_eq!(held_json.format, Format::Json);
        assert_eq!((held_json.version, held_json.configuration), (held.version, held.configuration));
    }

    #[test]
    fn env_key_values_convert_and_unknown_vm_fields_are_named() {
        let vm = json!({"runtime": "envoy.wasm.runtime.v8", "vm_id": "k",
            "code": {"local": {"inline_bytes": "AGFzbQ=="}}, "allow_precompiled": true,
            "environment_variables": {"host_env_keys": ["A"], "key_values": {"B": "1", "A2": "2"}}});
        let binary = VmConfig::Json(vm.clone()).to_binary().unwrap();
        assert_eq!(VmConfig::Binary(binary).to_json().unwrap(), vm);
        let remote = json!({"runtime": "v8", "code": {"remote": {"sha256": "x"}}});
        let err = VmConfig::Json(remote).to_binary().unwrap_err();
        assert!(err.contains("vm_config.code.remote") && err.contains(".json"), "{err}");
        let typed = VmConfig::Json(json!({"runtime": 8})).to_binary().unwrap_err();
        assert_eq!(typed, "vm_config.runtime: not a string");
        // A binary vm_config with a field the converter lacks (configuration = 4) is not silently dropped.
        let mut with_configuration = VmConfig::Json(json!({"runtime": "v8"})).to_binary().unwrap();
        with_configuration.extend_from_slice(&[0x22, 0x00]);
        assert!(VmConfig::Binary(with_configuration).to_json().unwrap_err().contains("code.remote, configuration"));
    }

    #[test]
    fn the_format_follows_the_name_as_envoy_reads_it() {
        assert_eq!(Format::of(Path::new("/x/keyswap.pb")), Ok(Format::Binary));
        assert_eq!(Format::of(Path::new("keyswap.PB")), Ok(Format::Binary));
        assert_eq!(Format::of(Path::new("keyswap.json")), Ok(Format::Json));
        assert_eq!(Format::of(Path::new("keyswap.yaml")), Ok(Format::Json));
        assert!(Format::of(Path::new("keyswap.pb_text")).unwrap_err().contains("text protobuf"));
    }

    #[test]
    fn garbage_is_no_resource_in_either_format() {
        for bytes in [&b""[..], b"{ this is not json\n", b"\x0a\x03abc\x12\x02\x0a\x00", &[0xff; 16]] {
            assert_eq!(read_resource(bytes), None, "{bytes:?}");
        }
    }

    #[test]
    fn stats_and_dump_are_read() {
        let mut view = EnvoyView::default();
        parse_stats(
            "extension_config_discovery.http_filter.keyswap.update_rejected: 2\n\
             extension_config_discovery.http_filter.keyswap.update_failure: 1\n\
             extension_config_discovery.http_filter.keyswap.update_attempt: 4\n\
             extension_config_discovery.http_filter.other.update_rejected: 9\n\
             extension_config_discovery.http_filter.keyswap.version_text: \"abc\"\n",
            &mut view,
        );
        let dump = json!({"configs": [{"ecds_filter": {"name": "keyswap"}, "version_info": "def",
            "error_state": {"details": "bad"}}]});
        parse_config_dump(&dump, &mut view);
        assert_eq!(
            view,
            EnvoyView {
                accepted: Some("abc".into()),
                rejected: 2,
                failed: 1,
                attempts: 4,
                dumped: Some("def".into()),
                dump_error: Some("bad".into())
            }
        );
    }

    #[test]
    fn env_names_are_found_anywhere() {
        let config = json!({"routes": [{"inject": [{"value": {"env": "B"}}, {"basic": {"password": {"env": "A"}}},
            {"value": {"env": "B"}}]}]});
        assert_eq!(env_names(&config), ["A", "B"]);
    }

    #[test]
    fn an_atomic_write_leaves_only_the_target() {
        let dir = std::env::temp_dir().join(format!("keyswap-ecds-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keyswap.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_write_is_private_keeps_no_world_bits_and_refuses_a_link() {
        let dir = std::env::temp_dir().join(format!("keyswap-ecds-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keyswap.json");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "0600, not the old 0644");
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = write_atomically(&link, b"via link").unwrap_err().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is kept");
        assert_eq!(std::fs::read(&path).unwrap(), b"new", "and its target untouched");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporary_names_are_random_and_the_lock_excludes() {
        assert_ne!(random_hex(), random_hex());
        assert_eq!(random_hex().len(), 32);
        let dir = std::env::temp_dir().join(format!("keyswap-ecds-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keyswap.json");
        let soon = || std::time::Instant::now() + std::time::Duration::from_millis(50);
        let (held, _) = lock(&path, soon()).unwrap();
        let err = lock(&path, soon()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        drop(held);
        assert!(lock(&path, soon()).is_ok(), "free again once dropped");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
