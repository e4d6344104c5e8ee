//! `keyswap rotate` and `keyswap revoke`: a key's lifecycle, as edits of
//! the configuration file, then (optionally) a push.
//!
//! ```text
//! CONFIG.json ─▶ ecds::lock(CONFIG): one rotate/revoke at a time per file (waits, within --timeout)
//!             ─▶ parse (refused? stop; nothing written)
//!             ─▶ rotate: a rotation in progress? report it, mint nothing
//!                        else a fresh key (digest stored), the client's other keys expire after the grace
//!                revoke: `disabled: true` on the client, or on one key (by id)
//!             ─▶ the real filter module loads the result (refused? stop; nothing written)
//!             ─▶ temp file + rename (ecds::write_atomically): the old file or the new, never half
//!             ─▶ rotate: the new key, printed once
//!             ─▶ --ecds: push::main, as `keyswap push` (the config lock still held)
//! ```
//!
//! A rotation in progress is read from the file itself: the key a
//! rotation adds carries `rotated_at` (when it began), and the client's
//! other keys that are not disabled carry the `expires` it set. While the
//! latest of those is still ahead, a rerun with the same grace reports the
//! rotation (and pushes again, if asked) instead of minting a key; with
//! another grace it is refused. Nothing printed holds a key or a digest,
//! but the new key, once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::ecds;
use keyswap_policy::time::{format_rfc3339, parse_rfc3339};

use crate::push::{self, PushOptions};
use crate::{Artifact, FilterModule};

/// Where to push after the edit, as `keyswap push` (no `--ecds`: the file
/// is only edited).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub ecds: Option<PathBuf>,
    pub envoy_admin: Option<String>,
    pub envoy_log: Option<PathBuf>,
    /// The longest the command waits for anything (the file's lock, then
    /// the push's), in seconds.
    pub timeout: f64,
    pub filter: Option<PathBuf>,
}

/// What a rotation did to the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// A key was added (its id), and these keys now expire at `expires`.
    Rotated { new_id: String, expiring: Vec<String>, expires: i64 },
    /// A rotation with this grace began at `began` and runs until `until`:
    /// nothing changed.
    InProgress { new_id: String, began: i64, until: i64 },
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// It was disabled already: nothing changed.
    Already,
}

/// Reads a duration: a whole number and a unit, `s`, `m`, `h` or `d`
/// (`2s`, `15m`, `24h`, `7d`).
///
/// # Errors
/// Anything else, or zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration such as 90s, 15m, 24h or 7d");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let seconds = n
        .checked_mul(scale)
        .filter(|s| *s > 0 && *s <= 366 * 86_400)
        .ok_or_else(|| format!("`{text}`: a grace period is at least 1s and at most 366d"))?;
    Ok(Duration::from_secs(seconds))
}

/// The client `id` in `config` (a whole configuration), mutably.
fn client_mut<'c>(config: &'c mut Value, id: &str) -> Result<&'c mut Map<String, Value>, String> {
    let clients = config.get_mut("clients").and_then(Value::as_array_mut).ok_or("the configuration has no clients")?;
    let found =
        clients.iter_mut().filter_map(Value::as_object_mut).find(|c| c.get("id").and_then(Value::as_str) == Some(id));
    found.ok_or_else(|| format!("no client has the id `{id}`"))
}

/// A key entry's digest: its `key_sha256`, or the digest of its `key`.
fn entry_digest(entry: &Map<String, Value>) -> Option<[u8; 32]> {
    if let Some(hex) = entry.get("key_sha256").and_then(Value::as_str) {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let text = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(text, 16).ok()?;
        }
        return Some(out);
    }
    entry.get("key").and_then(Value::as_str).map(|key| Sha256::digest(key.as_bytes()).into())
}

/// A key entry's id: given, else derived from its digest.
fn entry_id(entry: &Map<String, Value>) -> Option<String> {
    match entry.get("id").and_then(Value::as_str) {
        Some(id) => Some(id.to_string()),
        None => entry_digest(entry).map(|d| keyswap_policy::key_id(&d)),
    }
}

fn time_of(entry: &Map<String, Value>, field: &str) -> Option<i64> {
    entry.get(field).and_then(Value::as_str).and_then(parse_rfc3339)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Turns a single-key client (`key_sha256` or `key`) into one with a
/// `keys` list holding that key, as its digest (a plaintext key is not
/// kept); a client with `keys` is left as it is.
fn keys_of(client: &mut Map<String, Value>) -> Result<&mut Vec<Value>, String> {
    if !client.contains_key("keys") {
        let mut entry = Map::new();
        let digest = entry_digest(client).ok_or("the client has no key_sha256, key or keys")?;
        client.remove("key");
        client.remove("key_sha256");
        entry.insert("id".into(), Value::String(keyswap_policy::key_id(&digest)));
        entry.insert("key_sha256".into(), Value::String(hex(&digest)));
        client.insert("keys".into(), Value::Array(vec![Value::Object(entry)]));
    }
    client.get_mut("keys").and_then(Value::as_array_mut).ok_or_else(|| "the client's keys are not a list".to_string())
}

/// Rotates client `id`'s keys in `config` at `now` (Unix seconds): a new
/// key whose digest is `digest` is added with `rotated_at: now`, and every
/// other key that is not disabled expires at `now + grace` (or earlier, if
/// it already did). A rotation still in progress is reported instead.
///
/// # Errors
/// No such client; a rotation in progress with another grace.
pub fn rotate(config: &mut Value, id: &str, grace: Duration, now: i64, digest: &[u8; 32]) -> Result<Rotation, String> {
    let grace = i64::try_from(grace.as_secs()).map_err(|_| "the grace period is too long".to_string())?;
    let client = client_mut(config, id)?;
    if let Some(Value::Array(keys)) = client.get("keys") {
        let entries: Vec<&Map<String, Value>> = keys.iter().filter_map(Value::as_object).collect();
        let marked = entries.iter().filter_map(|e| Some((time_of(e, "rotated_at")?, *e))).max_by_key(|(at, _)| *at);
        if let Some((began, marker)) = marked {
            let live = |e: &&&Map<String, Value>| {
                !std::ptr::eq(**e, marker) && !e.get("disabled").and_then(Value::as_bool).unwrap_or(false)
            };
            let until =
                entries.iter().filter(live).filter_map(|e| time_of(e, "expires")).filter(|&at| at >= began).max();
            if let Some(until) = until.filter(|&until| now < until) {
                let new_id = entry_id(marker).unwrap_or_else(|| "?".into());
                if until - began != grace {
                    return Err(format!(
                        "a rotation of client `{id}` is in progress (key {new_id} added at {}, the other keys expire \
                         at {}, a grace of {}s, not {grace}s): rerun with that grace, wait until it ends, or revoke \
                         the old keys with `keyswap revoke --key`",
                        format_rfc3339(began),
                        format_rfc3339(until),
                        until - began
                    ));
                }
                return Ok(Rotation::InProgress { new_id, began, until });
            }
        }
    }
    let expires = now.saturating_add(grace);
    let keys = keys_of(client)?;
    let mut expiring = Vec::new();
    for entry in keys.iter_mut().filter_map(Value::as_object_mut) {
        // Only the newest rotation's key carries the marker.
        entry.remove("rotated_at");
        if entry.get("disabled").and_then(Value::as_bool).unwrap_or(false) {
            continue;
        }
        // Never later than it already was: a key past its expiry stays so.
        if time_of(entry, "expires").is_none_or(|at| at > expires) {
            entry.insert("expires".into(), Value::String(format_rfc3339(expires)));
        }
        if time_of(entry, "expires").is_some_and(|at| at > now) {
            expiring.push(entry_id(entry).unwrap_or_else(|| "?".into()));
        }
    }
    let new_id = keyswap_policy::key_id(digest);
    let mut entry = Map::new();
    entry.insert("id".into(), Value::String(new_id.clone()));
    entry.insert("key_sha256".into(), Value::String(hex(digest)));
    entry.insert("rotated_at".into(), Value::String(format_rfc3339(now)));
    keys.push(Value::Object(entry));
    Ok(Rotation::Rotated { new_id, expiring, expires })
}

/// Disables client `id` in `config`, or only its key `key` (by key id).
///
/// # Errors
/// No such client, or no such key.
pub fn revoke(config: &mut Value, id: &str, key: Option<&str>) -> Result<Revocation, String> {
    let client = client_mut(config, id)?;
    let target = match key {
        None => client,
        Some(key_id) => {
            let keys = client.get_mut("keys").and_then(Value::as_array_mut).ok_or_else(|| {
                format!(
                    "client `{id}` has a single key, which has no id: revoke the client (leave out --key), or rotate \
                     it first (`keyswap rotate` gives every key an id)"
                )
            })?;
            let found =
                keys.iter_mut().filter_map(Value::as_object_mut).find(|e| entry_id(e).as_deref() == Some(key_id));
            found.ok_or_else(|| format!("client `{id}` has no key with the id `{key_id}`"))?
        }
    };
    if target.get("disabled").and_then(Value::as_bool) == Some(true) {
        return Ok(Revocation::Already);
    }
    target.insert("disabled".into(), Value::Bool(true));
    Ok(Revocation::Revoked)
}

/// A fresh key: `ks_` and 32 random bytes, base64url (as `new-key`).
///
/// # Errors
/// The OS gives no randomness.
pub fn fresh_key() -> Result<String, String> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| format!("no randomness from the OS: {e}"))?;
    Ok(format!("ks_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)))
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The configuration file, locked, read and parsed; `edit` changes it; the
/// result is loaded by the filter module and written atomically (unless
/// `edit` changed nothing), then pushed when asked. `after_write` runs
/// between the write and the push (rotate prints the new key there).
fn edit_file<T>(
    config: &Path,
    delivery: &Delivery,
    edit: impl FnOnce(&mut Value) -> Result<(T, bool), String>,
    after_write: impl FnOnce(&T),
) -> Result<T, String> {
    let timeout =
        Duration::try_from_secs_f64(delivery.timeout).map_err(|_| "--timeout: not a number of seconds".to_string())?;
    let deadline = Instant::now() + timeout;
    // One edit at a time per file: a second rotate waits, then sees the
    // first one's rotation in progress.
    let (_lock, _) =
        ecds::lock(config, deadline).map_err(|e| format!("cannot lock {}: {e}; nothing written", config.display()))?;
    let text = std::fs::read(config).map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    // serde's message about broken JSON says where, never what.
    let mut value: Value = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "{}: not a JSON configuration (line {}, column {}); nothing written",
            config.display(),
            e.line(),
            e.column()
        )
    })?;
    if !value.is_object() {
        return Err(format!("{}: not a JSON object; nothing written", config.display()));
    }
    let (outcome, changed) = edit(&mut value)?;
    if changed {
        let mut out = serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?;
        out.push('\n');
        let module = FilterModule::load(&delivery.filter.clone().unwrap_or_else(|| Artifact::Filter.default_path()))
            .map_err(|e| e.to_string())?;
        push::check(&module, &out).map_err(|e| format!("the edited configuration is refused: {e}"))?;
        ecds::write_atomically(config, out.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}; the file is as it was", config.display()))?;
        println!("wrote {}", config.display());
    }
    after_write(&outcome);
    if let Some(ecds) = &delivery.ecds {
        push::main(&PushOptions {
            config: config.to_path_buf(),
            ecds: ecds.clone(),
            envoy_admin: delivery.envoy_admin.clone(),
            envoy_log: delivery.envoy_log.clone(),
            timeout: delivery.timeout,
            force: false,
            filter: delivery.filter.clone(),
        })?;
    }
    Ok(outcome)
}

/// Runs `keyswap rotate`, printing as it goes.
///
/// # Errors
/// The message to print after `error: `.
pub fn rotate_main(config: &Path, client: &str, grace: &str, delivery: &Delivery) -> Result<(), String> {
    let grace = parse_duration(grace).map_err(|e| format!("--grace: {e}"))?;
    let key = fresh_key()?;
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let edit = |value: &mut Value| {
        let rotation = rotate(value, client, grace, unix_now(), &digest)?;
        let changed = matches!(rotation, Rotation::Rotated { .. });
        Ok((rotation, changed))
    };
    let report = |rotation: &Rotation| match rotation {
        Rotation::Rotated { new_id, expiring, expires } => {
            let old = if expiring.is_empty() { "none".to_string() } else { expiring.join(", ") };
            println!(
                "rotated client {client}: new key {new_id}; its other keys ({old}) expire at {}",
                format_rfc3339(*expires)
            );
            println!("key (shown once; give it to the client and keep no copy):");
            println!("{key}");
        }
        Rotation::InProgress { new_id, began, until } => {
            println!(
                "a rotation of client {client} is already in progress: key {new_id} added at {}, the other keys \
                 expire at {} ({}s from now); no new key made, nothing written",
                format_rfc3339(*began),
                format_rfc3339(*until),
                until - unix_now()
            );
        }
    };
    edit_file(config, delivery, edit, report).map(|_| ())
}

/// Runs `keyswap revoke`, printing as it goes.
///
/// # Errors
/// The message to print after `error: `.
pub fn revoke_main(config: &Path, client: &str, key: Option<&str>, delivery: &Delivery) -> Result<(), String> {
    let edit = |value: &mut Value| {
        let revocation = revoke(value, client, key)?;
        let changed = revocation == Revocation::Revoked;
        Ok((revocation, changed))
    };
    let what = match key {
        Some(key) => format!("key {key} of client {client}"),
        None => format!("client {client} (every key)"),
    };
    let report = |revocation: &Revocation| match revocation {
        Revocation::Revoked => println!("revoked {what}"),
        Revocation::Already => println!("{what} was revoked already; nothing written"),
    };
    edit_file(config, delivery, edit, report).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn config() -> Value {
        json!({"clients": [
            {"id": "a", "key_sha256": "ab".repeat(32), "routes": ["*"]},
            {"id": "b", "routes": ["*"], "keys": [{"id": "b1", "key": "b-key-1"}, {"key": "b-key-2", "disabled": true}]}
        ], "routes": []})
    }

    #[test]
    fn durations_need_a_unit_and_stay_in_bounds() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "2", "s", "0s", "-1s", "1.5h", "2w", "400d", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rotation_adds_a_key_and_expires_the_others_once() {
        let mut c = config();
        let digest = [7u8; 32];
        let grace = Duration::from_secs(60);
        let first = rotate(&mut c, "a", grace, NOW, &digest).unwrap();
        let new_id = keyswap_policy::key_id(&digest);
        let old_id = keyswap_policy::key_id(&[0xab; 32]);
        assert_eq!(first, Rotation::Rotated { new_id: new_id.clone(), expiring: vec![old_id], expires: NOW + 60 });
        let keys = c["clients"][0]["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert!(c["clients"][0].get("key_sha256").is_none(), "the single key moved into keys");
        assert_eq!(keys[0]["expires"], format_rfc3339(NOW + 60));
        assert_eq!(keys[1]["key_sha256"], hex(&digest));
        assert_eq!(keys[1]["rotated_at"], format_rfc3339(NOW));
        assert!(keys[1].get("expires").is_none());
        // Again inside the grace, same arguments: reported, nothing changed.
        let before = c.clone();
        let again = rotate(&mut c, "a", grace, NOW + 30, &[8u8; 32]).unwrap();
        assert_eq!(again, Rotation::InProgress { new_id, began: NOW, until: NOW + 60 });
        assert_eq!(c, before);
        // Another grace while it runs: refused, nothing changed.
        assert!(rotate(&mut c, "a", Duration::from_secs(10), NOW + 30, &[8u8; 32]).is_err());
        assert_eq!(c, before);
        // After the grace: a new rotation; the expired key stays expired.
        let later = rotate(&mut c, "a", grace, NOW + 61, &[9u8; 32]).unwrap();
        let Rotation::Rotated { expiring, .. } = later else { panic!("{later:?}") };
        assert_eq!(expiring, vec![keyswap_policy::key_id(&digest)]);
        let keys = c["clients"][0]["keys"].as_array().unwrap();
        assert_eq!(keys[0]["expires"], format_rfc3339(NOW + 60));
        assert!(keys[1].get("rotated_at").is_none(), "only the newest key carries the marker");
        assert_eq!(keys[2]["rotated_at"], format_rfc3339(NOW + 61));
    }

    #[test]
    fn disabled_keys_are_left_alone_and_revoke_finds_keys_by_id() {
        let mut c = config();
        rotate(&mut c, "b", Duration::from_secs(5), NOW, &[1u8; 32]).unwrap();
        assert!(c["clients"][1]["keys"][1].get("expires").is_none(), "a disabled key is not given an expiry");
        let derived = keyswap_policy::key_id(&Sha256::digest(b"b-key-2").into());
        assert_eq!(revoke(&mut c, "b", Some(&derived)), Ok(Revocation::Already));
        assert_eq!(revoke(&mut c, "b", Some("b1")), Ok(Revocation::Revoked));
        assert_eq!(c["clients"][1]["keys"][0]["disabled"], true);
        assert!(revoke(&mut c, "b", Some("nope")).is_err());
        assert!(revoke(&mut c, "a", Some("x")).unwrap_err().contains("single key"));
        assert_eq!(revoke(&mut c, "a", None), Ok(Revocation::Revoked));
        assert_eq!(c["clients"][0]["disabled"], true);
        assert!(revoke(&mut c, "zz", None).is_err());
    }

    #[test]
    fn messages_never_show_a_key_or_digest() {
        let mut c = config();
        rotate(&mut c, "b", Duration::from_secs(5), NOW, &[1u8; 32]).unwrap();
        let err = rotate(&mut c, "b", Duration::from_secs(9), NOW + 1, &[2u8; 32]).unwrap_err();
        for secret in ["b-key-1", &hex(&[1u8; 32]), &hex(&[2u8; 32])] {
            assert!(!err.contains(secret), "{err}");
        }
    }
}
