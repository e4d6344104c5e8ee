//! The keyswap filter's configuration as an Envoy ECDS resource, and what
//! Envoy's admin says about it. Pure apart from [`write_atomically`]; no
//! wasmtime here, so the end-to-end tests compile this very file too
//! (`tests/src/lib.rs`), and `keyswap push` and the tests write the same
//! bytes the same way.
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

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

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

/// The keyswap filter in a `DiscoveryResponse` (or a single
/// `TypedExtensionConfig`): its Wasm `config` object.
fn wasm_config(response: &Value) -> Option<&Value> {
    let extension = match response.get("resources") {
        Some(resources) => resources.as_array()?.iter().find(|r| r.get("name").and_then(Value::as_str) == Some(RESOURCE_NAME))?,
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
/// directory, flushed to disk, then renamed over `path`. Envoy watches the
/// directory for files moved into it, so it sees one rename and never a
/// half-written file. Returns the moment the rename was started: a clock
/// read after it could come later than Envoy's reaction on a busy machine.
///
/// # Errors
/// The directory is missing or not writable; the temporary file is removed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<std::time::SystemTime> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        // The resource can hold secrets: the file keeps the mode of the one
        // it replaces, or is readable by its owner only. `create_new` never
        // follows a link planted at the temporary name.
        let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o777);
        let _ = std::fs::remove_file(&temp);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        let renaming = std::time::SystemTime::now();
        std::fs::rename(&temp, path)?;
        Ok(renaming)
    })();
    match written {
        Ok(renaming) => Ok(renaming),
        Err(err) => {
            let _ = std::fs::remove_file(&temp);
            Err(err)
        }
    }
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
                e.get("details").and_then(Value::as_str).unwrap_or("an error without details (see Envoy's log)").to_string()
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
    fn stats_and_dump_are_read() {
        let mut view = EnvoyView::default();
        parse_stats(
            "extension_config_discovery.http_filter.keyswap.update_rejected: 2\n\
             extension_config_discovery.http_filter.keyswap.update_failure: 1\n\
             extension_config_discovery.http_filter.other.update_rejected: 9\n\
             extension_config_discovery.http_filter.keyswap.version_text: \"abc\"\n",
            &mut view,
        );
        let dump = json!({"configs": [{"ecds_filter": {"name": "keyswap"}, "version_info": "def",
            "error_state": {"details": "bad"}}]});
        parse_config_dump(&dump, &mut view);
        assert_eq!(
            view,
            EnvoyView { accepted: Some("abc".into()), rejected: 2, failed: 1, dumped: Some("def".into()), dump_error: Some("bad".into()) }
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
}
