//! `echo-upstream [ADDR]`: the echo upstream as a program, for
//! `scripts/demo` and for poking at by hand. Listens on `ADDR`
//! (default `127.0.0.1:10001`) until killed, HTTP/1.1 and h2c; see
//! `keyswap_tests::echo`.

fn main() -> std::process::ExitCode {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:10001".to_string());
    let echo = match keyswap_tests::echo::Echo::start(&addr) {
        Ok(echo) => echo,
        Err(e) => {
            eprintln!("echo-upstream: cannot listen on {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The bound address, so `127.0.0.1:0` (a kernel-picked port) is usable.
    eprintln!("echo-upstream: listening on http://{}", echo.addr());
    echo.wait();
    std::process::ExitCode::SUCCESS
}
