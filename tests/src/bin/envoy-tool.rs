//! `envoy-tool`: what `scripts/setup`, `scripts/ecds-resource` and
//! `scripts/demo` ask of an Envoy they run themselves, from the code the
//! tests and `keyswap push` use:
//!
//! - `ecds-resource CONFIG.json ECDS_FILE`: writes the configuration into
//!   the ECDS file `envoy.yaml` watches, the way `keyswap push` writes it
//!   (`keyswap_envoy_config::ecds`: the resource with `envoy.yaml`'s
//!   `vm_config`, versioned by content, 0600, written atomically), without
//!   checking it or asking Envoy; prints the version.
//! - `wait --admin ADDR --log FILE [--pid PID] --version V`: waits until
//!   Envoy's admin answers `/ready` (`envoy::wait_ready`, 60 s) and keyswap
//!   has logged loading version `V` (`envoy::wait_loaded`, reading
//!   `Summary::from_log_line`); prints that line's summary. With `--pid`,
//!   fails as soon as that process is gone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyswap_envoy_config::ecds;
use keyswap_tests::envoy::{tail, wait_loaded, wait_ready, LOADED_TIMEOUT, READY_TIMEOUT};

#[derive(Parser)]
#[command(about = "The ECDS resource and the readiness wait for scripts that run Envoy themselves")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write CONFIG (keyswap's JSON, byte for byte) into ECDS_FILE as
    /// `keyswap push` does, without checking it; print its version.
    EcdsResource { config: PathBuf, ecds_file: PathBuf },
    /// Wait until Envoy is ready and keyswap has loaded configuration VERSION.
    Wait {
        /// Envoy's admin address (127.0.0.1:9901).
        #[arg(long)]
        admin: SocketAddr,
        /// Envoy's log file.
        #[arg(long)]
        log: PathBuf,
        /// Envoy's process id: stop waiting once it is gone.
        #[arg(long)]
        pid: Option<u32>,
        /// The configuration's version (`keyswap_policy::content_version`).
        #[arg(long)]
        version: String,
    },
}

fn ecds_resource(config: &Path, ecds_file: &Path) -> Result<(), String> {
    let bytes = std::fs::read(config).map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", config.display()))?;
    // Binary for a `.pb` file (envoy.yaml's), JSON otherwise: as push writes.
    let format = ecds::Format::of(ecds_file)?;
    let resource = ecds::encode(format, &text, &ecds::VmConfig::Json(ecds::default_vm_config()))?;
    ecds::write_atomically(ecds_file, &resource).map_err(|e| format!("cannot write {}: {e}", ecds_file.display()))?;
    println!("{}", keyswap_policy::content_version(text.as_bytes()));
    Ok(())
}

fn wait(admin: SocketAddr, log: &Path, pid: Option<u32>, version: &str) -> Result<(), String> {
    let read = || std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    // Gone, or a zombie its parent has not reaped yet.
    let gone = || {
        let pid = pid?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        matches!(state, None | Some("Z" | "X")).then(|| format!("pid {pid} is gone"))
    };
    let fail = |why: String| format!("{why}\n---- Envoy log {}\n{}", log.display(), tail(&read(), 30));
    wait_ready(|| Some(admin), gone, READY_TIMEOUT).map_err(fail)?;
    let loaded = wait_loaded(read, &[version.to_string()], LOADED_TIMEOUT).map_err(fail)?;
    for summary in loaded {
        println!("{}", summary.log_line());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = match &cli.command {
        Command::EcdsResource { config, ecds_file } => ecds_resource(config, ecds_file),
        Command::Wait { admin, log, pid, version } => wait(*admin, log, *pid, version),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("envoy-tool: {message}");
            ExitCode::FAILURE
        }
    }
}
