//! Runner `harness`: the conformance suite through the filter's wasm module in the
//! harness (every case a fresh VM with the case's environment, real time).

use keyswap_conformance::{default_dir, Suite};
use keyswap_harness::runner::{check_unimplemented, run_suite};

use crate::filter;

#[test]
fn conformance_suite_passes_in_the_harness() {
    let suite = Suite::load(&default_dir()).unwrap_or_else(|e| panic!("the suite does not load: {e}"));
    let (report, unimplemented) = run_suite(filter(), &suite);
    println!("{}", report.render());
    assert!(report.failed.is_empty(), "{}", report.render());
    assert!(report.passed >= 1, "no case ran");
    if let Err(message) = check_unimplemented(&unimplemented) {
        panic!("{message}");
    }
}
