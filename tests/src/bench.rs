//! What the Envoy benchmark (`envoy-bench`) and the soak (`envoy-soak`)
//! share besides [`crate::envoy`]'s bootstraps and waits: the responder as
//! its own process (the `echo-upstream` binary, optionally pinned to a CPU
//! with `taskset`), an Envoy's CPU time and memory from `/proc`, and where
//! their programs are.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `echo-upstream` binary next to the running program (cargo builds
/// both binaries of this crate into one directory).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().map_or_else(|| PathBuf::from(name), |dir| dir.join(name))
}

/// The echo upstream as its own process; killed on drop.
pub struct Responder {
    child: Child,
    addr: SocketAddr,
}

impl Responder {
    /// Starts `binary` (`echo-upstream`) on a kernel-picked loopback port,
    /// pinned with `taskset -c CPU` if `cpu` is given; its stderr goes to
    /// `log`. Returns once it says where it listens.
    ///
    /// # Errors
    /// It cannot start, exits, or says nothing within 10 s.
    pub fn start(binary: &Path, cpu: Option<&str>, log: &Path) -> Result<Self, String> {
        let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpu]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let mut responder = Self { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let said = text.lines().find_map(|l| l.split_once("listening on http://").map(|(_, a)| a.trim()));
            if let Some(addr) = said.and_then(|a| a.parse().ok()) {
                responder.addr = addr;
                return Ok(responder);
            }
            if let Ok(Some(status)) = responder.child.try_wait() {
                return Err(format!("the responder exited ({status}) while starting: {text}"));
            }
            if Instant::now() >= deadline {
                return Err(format!("the responder did not say where it listens within 10 s: {text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pins every thread of process `pid` to `cpu` (`taskset -a -p -c`);
/// threads it starts later inherit it.
///
/// # Errors
/// taskset failed.
pub fn pin(pid: u32, cpu: &str) -> Result<(), String> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", cpu, &pid.to_string()])
        .output()
        .map_err(|e| format!("taskset: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("taskset -a -p -c {cpu} {pid}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// utime + stime of every thread of `pid`, in clock ticks (`/proc/PID/stat`).
///
/// # Errors
/// The process is gone or the file is not as expected.
pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // After the ")" that ends the command name, field 3 (state) is index 0,
    // so utime (14) is 11 and stime (15) is 12.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (field(11), field(12)) {
        (Some(utime), Some(stime)) => Ok(utime + stime),
        _ => Err(format!("/proc/{pid}/stat: unexpected {stat}")),
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
pub fn ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// The resident set of `pid` in KiB (`VmRSS` of `/proc/PID/status`).
///
/// # Errors
/// The process is gone.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status: no VmRSS"))
}
