//! The filter's configure step without Envoy: a configuration handed in by
//! the host, loaded by the same `Policy::from_json` the filter runs in
//! `proxy_on_configure`, built like the filter (`--profile filter`) for
//! wasm32-wasip1 and timed in V8, Envoy's wasm engine, by `run.mjs`
//! (`scripts/bench-configure`). Plain exports, not proxy-wasm: the host is
//! node, not Envoy.

use std::cell::RefCell;

thread_local! {
    static CONFIG: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Makes room for a configuration of `len` bytes; returns where the host
/// writes it (valid until the next call).
#[no_mangle]
pub extern "C" fn config_buffer(len: u32) -> *mut u8 {
    CONFIG.with(|c| {
        let mut c = c.borrow_mut();
        c.clear();
        c.resize(len as usize, 0);
        c.as_mut_ptr()
    })
}

/// Loads the configuration as the filter does, with `BENCH_UPSTREAM_CREDENTIAL`
/// set as the benchmark's Envoy sets it (the policy is then dropped, as a
/// replaced one is); 1 when it loaded, 0 when refused.
#[no_mangle]
pub extern "C" fn configure() -> u32 {
    let env = |name: &str| (name == "BENCH_UPSTREAM_CREDENTIAL").then(|| "bench-upstream-credential".to_string());
    CONFIG.with(|c| u32::from(keyswap_policy::Policy::from_json(&c.borrow(), &env).is_ok()))
}
