//! `echo-upstream [ADDR]`: the echo upstream as a program, for
//! `scripts/demo` and for poking at by hand. Listens on `ADDR`
//! (default `127.0.0.1:10001`) until killed; see `keyswap_tests::echo`.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;

fn main() -> std::process::ExitCode {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:10001".to_string());
    let listener = match TcpListener::bind(&addr) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("echo-upstream: cannot listen on {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The bound address, so `127.0.0.1:0` (a kernel-picked port) is usable.
    let bound = listener.local_addr().map_or(addr, |a| a.to_string());
    eprintln!("echo-upstream: listening on http://{bound}");
    keyswap_tests::echo::serve(&listener, &AtomicBool::new(false));
    std::process::ExitCode::SUCCESS
}
