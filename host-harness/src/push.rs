//! `keyswap push`: deliver a keyswap configuration to a running Envoy
//! through the ECDS file it watches, and confirm it with Envoy itself.
//!
//! ```text
//! CONFIG.json ─▶ the real filter module (refused? stop; nothing written)
//!             ─▶ ecds::resource (version = content_version of CONFIG.json)
//!             ─▶ same bytes as the file already holds? "unchanged", nothing written
//!             ─▶ temp file + rename in the watched directory
//!             ─▶ --envoy-admin: poll /stats and /config_dump until Envoy
//!                accepted that version (exit 0) or rejected it (exit 1, with why)
//! ```
//!
//! Envoy 1.40 shows a refused file resource in `/config_dump` anyway (its
//! `version_info` and content, no `error_state`), so "active" is read from
//! the ECDS stats: `extension_config_discovery.http_filter.keyswap.version_text`
//! (the accepted version) and `update_rejected`. Nothing printed holds a
//! key or a credential: the configuration's values are never echoed, and
//! the filter's own lines never contain them.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ecds::{self, EnvoyView};
use crate::{default_filter_path, FilterModule, HarnessError, LogLevel};

/// The value `push` gives each `{"env": NAME}` variable when it checks a
/// configuration: the credentials live in Envoy's environment, not here, so
/// only Envoy can tell whether they are set (and `push` reports it if not).
pub const PLACEHOLDER: &str = "keyswap-push-placeholder";

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The keyswap configuration (JSON), sent byte for byte.
    pub config: PathBuf,
    /// The ECDS file Envoy watches (envoy.yaml: .run/ecds/keyswap.json).
    #[arg(long, value_name = "PATH")]
    pub ecds: PathBuf,
    /// Envoy's admin (http://127.0.0.1:9901): wait until Envoy runs the new
    /// version, or report its rejection and exit 1.
    #[arg(long, value_name = "URL")]
    pub envoy_admin: Option<String>,
    /// Envoy's log file: on a rejection, print the lines that say why
    /// (Envoy's admin does not keep the reason for a file source).
    #[arg(long, value_name = "PATH")]
    pub envoy_log: Option<PathBuf>,
    /// How long to wait for Envoy, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub timeout: f64,
    /// The filter module (default: $KEYSWAP_FILTER, else the workspace's
    /// target/wasm32-wasip1/release/keyswap_filter.wasm).
    #[arg(long, value_name = "PATH")]
    pub filter: Option<PathBuf>,
}

/// Runs `keyswap push`, printing as it goes.
///
/// # Errors
/// The message to print after `error: ` (empty when already printed).
pub fn main(args: &PushArgs) -> Result<(), String> {
    let text = std::fs::read(&args.config).map_err(|e| format!("cannot read {}: {e}", args.config.display()))?;
    let text = String::from_utf8(text).map_err(|_| format!("{}: not UTF-8 text", args.config.display()))?;
    let module = FilterModule::load(&args.filter.clone().unwrap_or_else(default_filter_path)).map_err(|e| e.to_string())?;
    let summary = check(&module, &text)?;
    let version = keyswap_policy::content_version(text.as_bytes());
    let admin = args.envoy_admin.as_deref().map(Admin::parse).transpose()?;
    let timeout = Duration::try_from_secs_f64(args.timeout).map_err(|_| "--timeout: not a number of seconds".to_string())?;

    let existing = std::fs::read(&args.ecds).ok();
    let vm_config = match existing.as_deref().map(serde_json::from_slice::<Value>) {
        None => ecds::default_vm_config(),
        Some(Ok(response)) => ecds::vm_config_of(&response).unwrap_or_else(ecds::default_vm_config),
        Some(Err(_)) => {
            println!("note: {} is not a keyswap ECDS resource; replacing it (default vm_config)", args.ecds.display());
            ecds::default_vm_config()
        }
    };
    let bytes = ecds::resource_bytes(&text, &vm_config);

    if existing.as_deref() == Some(bytes.as_slice()) {
        println!("unchanged: {} already holds version {version}; nothing written", args.ecds.display());
        let Some(admin) = admin else { return Ok(()) };
        let view = admin.view()?;
        return if view.accepted.as_deref() == Some(version.as_str()) {
            println!("active: Envoy runs version {version}");
            Ok(())
        } else {
            Err(format!(
                "Envoy does not run version {version} (it runs {}); the file held it already, so Envoy refused it \
                 earlier: see Envoy's log for `keyswap: configuration refused`",
                view.accepted.as_deref().unwrap_or("its default configuration")
            ))
        };
    }

    let before = admin.as_ref().map(Admin::view).transpose()?;
    let log_offset = args.envoy_log.as_deref().map(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
    ecds::write_atomically(&args.ecds, &bytes).map_err(|e| format!("cannot write {}: {e}", args.ecds.display()))?;
    let renamed = Instant::now();
    println!("wrote {}: version {version} ({summary})", args.ecds.display());
    let (Some(admin), Some(before)) = (admin, before) else { return Ok(()) };

    let deadline = renamed + timeout;
    loop {
        let view = admin.view()?;
        if view.accepted.as_deref() == Some(version.as_str()) {
            println!("active: Envoy runs version {version} ({} ms after the rename)", renamed.elapsed().as_millis());
            return Ok(());
        }
        if view.rejected > before.rejected || view.failed > before.failed {
            let runs = view.accepted.as_deref().unwrap_or("its default configuration").to_string();
            println!("rejected: Envoy refused version {version} and keeps running {runs}");
            if let Some(error) = &view.dump_error {
                println!("  Envoy: {error}");
            }
            match (&args.envoy_log, log_offset) {
                (Some(log), Some(offset)) => print_reasons(log, offset),
                _ => println!("  (give --envoy-log PATH to see Envoy's reason; it logs it, the admin does not keep it)"),
            }
            restore(&args.ecds, existing.as_deref());
            return Err(String::new());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "Envoy did not take version {version} within {timeout:?} (it runs {}; config_dump shows {}); \
                 is --ecds the file this Envoy watches?",
                view.accepted.as_deref().unwrap_or("its default configuration"),
                view.dumped.as_deref().unwrap_or("no keyswap resource"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Puts back what the ECDS file held before a push Envoy rejected, so that
/// the file says what Envoy runs and a restart does not start from the
/// refused resource.
fn restore(path: &Path, previous: Option<&[u8]>) {
    let Some(previous) = previous else {
        println!("  {} keeps the refused resource (it held nothing before); push a good configuration", path.display());
        return;
    };
    match ecds::write_atomically(path, previous) {
        Ok(_) => println!("  restored {} to what it held before the push", path.display()),
        Err(e) => println!("  could not restore {}: {e}; push a good configuration", path.display()),
    }
}

/// Loads `text` into a fresh VM of the filter, with a placeholder for every
/// variable it names; returns the load line's summary.
fn check(module: &FilterModule, text: &str) -> Result<String, String> {
    let names = serde_json::from_str::<Value>(text).map(|v| ecds::env_names(&v)).unwrap_or_default();
    let env: BTreeMap<String, String> = names.into_iter().map(|n| (n, PLACEHOLDER.to_string())).collect();
    match module.configure(text.as_bytes(), &env) {
        Ok(instance) => Ok(instance
            .log()
            .iter()
            .rev()
            .find(|e| e.level >= LogLevel::Info)
            .and_then(|e| e.message.split_once("configuration loaded: "))
            .map(|(_, summary)| summary.split(", version ").next().unwrap_or(summary).to_string())
            .unwrap_or_else(|| "loaded".to_string())),
        Err(HarnessError::Refused { log }) => {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("refused") || l.contains("panic")).collect();
            let why = if lines.is_empty() { "the filter refused it".to_string() } else { lines.join("; ") };
            Err(format!("{why} (nothing written)").replace("keyswap: ", ""))
        }
        Err(err) => Err(err.to_string()),
    }
}

/// Prints the lines Envoy logged after `offset` that say why it refused an
/// update (waiting briefly: the log may trail the stats).
fn print_reasons(log: &Path, offset: u64) {
    let wanted = |l: &&str| {
        l.contains("config update rejected") || l.contains("config update failure") || l.contains("configuration refused")
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let lines: Vec<String> = loop {
        let text = std::fs::read(log).ok().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(text.len());
        let new = text.get(start..).unwrap_or_default();
        let mut lines: Vec<String> = new.lines().filter(wanted).map(|l| without_prefix(l).to_string()).collect();
        // One line per worker says the same thing.
        let mut seen = std::collections::BTreeSet::new();
        lines.retain(|l| seen.insert(l.clone()));
        if lines.iter().any(|l| l.contains("config update")) || Instant::now() >= deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if lines.is_empty() {
        println!("  (no rejection found in {})", log.display());
    }
    for line in lines {
        println!("  Envoy: {line}");
    }
}

/// An Envoy log line without its `[time][thread][level][logger] [source:line] ` prefix.
fn without_prefix(line: &str) -> &str {
    let rest = line.find("[source/").and_then(|i| line[i..].find("] ").map(|j| &line[i + j + 2..])).unwrap_or(line);
    rest.strip_prefix("wasm log: ").unwrap_or(rest)
}

/// Envoy's admin endpoint.
struct Admin {
    /// `HOST:PORT`.
    authority: String,
}

impl Admin {
    fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("--envoy-admin {url}: want http://HOST:PORT"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() || !authority.contains(':') {
            return Err(format!("--envoy-admin {url}: want http://HOST:PORT"));
        }
        Ok(Self { authority: authority.to_string() })
    }

    fn view(&self) -> Result<EnvoyView, String> {
        let mut view = EnvoyView::default();
        let filter = format!("^extension_config_discovery\\.http_filter\\.{}\\.", ecds::RESOURCE_NAME);
        ecds::parse_stats(&self.get(&format!("/stats?filter={filter}"))?, &mut view);
        let dump = self.get("/config_dump?resource=ecds_filters")?;
        // An Envoy without ECDS answers an empty object, or an error text.
        if let Ok(dump) = serde_json::from_str::<Value>(&dump) {
            ecds::parse_config_dump(&dump, &mut view);
        }
        Ok(view)
    }

    /// GET `path`; the body of a 200 answer.
    fn get(&self, path: &str) -> Result<String, String> {
        let fail = |e: &dyn std::fmt::Display| format!("Envoy's admin at http://{}: {e}", self.authority);
        let addr = self.authority.to_socket_addrs().map_err(|e| fail(&e))?.next().ok_or_else(|| fail(&"no address"))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| fail(&e))?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| fail(&e))?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n", self.authority);
        stream.write_all(request.as_bytes()).map_err(|e| fail(&e))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(|e| fail(&e))?;
        let (head, body) = split_response(&raw).ok_or_else(|| fail(&"not an HTTP response"))?;
        let status = head.lines().next().unwrap_or_default();
        if status.split(' ').nth(1) != Some("200") {
            return Err(fail(&format!("GET {path}: {status}")));
        }
        let chunked = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("transfer-encoding:") && l.contains("chunked")
        });
        let body = if chunked { dechunk(body).ok_or_else(|| fail(&"bad chunked body"))? } else { body.to_vec() };
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

fn split_response(raw: &[u8]) -> Option<(String, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((String::from_utf8_lossy(&raw[..end]).into_owned(), &raw[end + 4..]))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").as_deref(), Some(&b"abcde"[..]));
        assert_eq!(dechunk(b"5\r\nab"), None);
    }

    #[test]
    fn envoy_prefixes_are_removed() {
        let line = "[2026-11-23 10:59:31.789][27757][error][wasm] [source/extensions/common/wasm/context.cc:1157] \
                    wasm log: keyswap: configuration refused: x: y";
        assert_eq!(without_prefix(line), "keyswap: configuration refused: x: y");
    }

    #[test]
    fn admin_urls_need_a_port() {
        assert!(Admin::parse("http://127.0.0.1:9901").is_ok());
        assert!(Admin::parse("127.0.0.1:9901").is_err());
        assert!(Admin::parse("http://localhost/").is_err());
    }
}
