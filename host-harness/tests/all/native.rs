//! Runner 1: the conformance suite through the policy itself, no wasm.

use keyswap_harness::conformance::{default_dir, Case, Observed, Report, Suite};
use keyswap_policy::{Decision, Policy, RequestView};

fn observe(case: &Case) -> Result<Observed, String> {
    let env = |name: &str| case.env.get(name).cloned();
    let policy = match Policy::from_json(case.config.as_bytes(), &env) {
        Ok(policy) => policy,
        Err(err) => return Ok(Observed::ConfigRefused { log: err.to_string() }),
    };
    let mut headers = case.request.header_list();
    let view = RequestView::from_headers(case.request.route_name.as_deref(), &headers);
    let now = || {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        since.map_or(0, |d| d.as_secs() as i64)
    };
    match policy.decide(&view, &now) {
        Decision::Deny(denial) => {
            let reason = denial.reason;
            let headers = reason.headers().iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
            Ok(Observed::Denied { status: reason.status(), headers, body: reason.body().into_bytes() })
        }
        Decision::Forward(forward) => {
            forward.apply(&mut headers);
            let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
            let path = headers.iter().find(|(n, _)| n == ":path").map(|(_, v)| text(v)).unwrap_or_default();
            let upstream = headers.iter().filter(|(n, _)| !n.starts_with(':')).map(|(n, v)| (n.clone(), text(v)));
            let client_response = case.response.as_ref().map(|response| {
                let list: Vec<(String, Vec<u8>)> =
                    response.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec())).collect();
                let removed = policy.response_removals(&list);
                list.iter()
                    .filter(|(n, _)| !removed.contains(&n.as_str()))
                    .map(|(n, v)| (n.clone(), text(v)))
                    .collect()
            });
            Ok(Observed::Forwarded { path, headers: upstream.collect(), client_response })
        }
    }
}

#[test]
fn conformance_suite_passes_natively() {
    let suite = Suite::load(&default_dir()).expect("the suite loads");
    let plan = suite.plan("native").expect("the skip list is sound");
    let report = Report::run(&plan, observe);
    println!("{}", report.render());
    assert!(report.failed.is_empty(), "{}", report.render());
    assert!(report.passed >= 1, "no case ran");
}
