//! The denial table in docs/config.md says what the policy does: every
//! reason once, with its status and its extra header, and nothing else.

use keyswap_policy::DenialReason;

/// `(code, status, extra header cell)` for each row of the table under
/// "Denials are JSON".
fn table() -> Vec<(String, u16, String)> {
    let doc = include_str!("../../../docs/config.md");
    let start = doc.find("| reason | status | extra header |").expect("the denial table in docs/config.md");
    doc[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let code = cells[0].trim_matches('`').to_string();
            let status = cells[1].parse().unwrap_or_else(|e| panic!("{line}: {e}"));
            (code, status, cells.get(2).copied().unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn the_denial_table_is_the_policys() {
    let rows = table();
    let codes: Vec<&str> = rows.iter().map(|(c, _, _)| c.as_str()).collect();
    let mut want: Vec<&str> = DenialReason::ALL.iter().map(|r| r.code()).collect();
    let mut got = codes.clone();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "every reason once, and nothing else");
    for reason in DenialReason::ALL {
        let (_, status, extra) = rows.iter().find(|(c, _, _)| c == reason.code()).expect("a row");
        assert_eq!(*status, reason.status(), "{}", reason.code());
        // The extra header the table names (beyond content-type and
        // cache-control), by its name and value, or `as <reason>`.
        let extras: Vec<_> =
            reason.headers().iter().filter(|(name, _)| *name != "content-type" && *name != "cache-control").collect();
        match extras.as_slice() {
            [] => assert!(!extra.contains(':') && !extra.starts_with("as "), "{}: {extra}", reason.code()),
            [(name, value)] => {
                let written = format!("`{name}: {value}`");
                let same_as = rows.iter().find(|(c, _, _)| extra == &format!("as `{c}`"));
                let shown = match same_as {
                    Some((other, _, cell)) => {
                        let other = DenialReason::ALL.iter().find(|r| r.code() == other).expect("a reason");
                        assert_eq!(other.headers(), reason.headers(), "{} is `as {}`", reason.code(), other.code());
                        cell.clone()
                    }
                    None => extra.clone(),
                };
                assert!(shown.starts_with(&written), "{}: the table says {extra}, the policy {written}", reason.code());
            }
            more => panic!("{}: more extra headers than the table can say: {more:?}", reason.code()),
        }
    }
}

/// The WIT's `denial` record lists every status a denial can have, and
/// codes that exist.
#[test]
fn the_wit_denial_record_is_the_policys() {
    let wit = include_str!("../../../wit/keyswap.wit");
    let start = wit.find("/// The HTTP status: ").expect("the status list in wit/keyswap.wit");
    let text: String = wit[start..].lines().take_while(|l| !l.contains("status: u16")).collect::<Vec<_>>().join(" ");
    let numbers: Vec<u16> = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| w.len() == 3)
        .map(|w| w.parse().unwrap_or_else(|e| panic!("{w}: {e}")))
        .collect();
    let (listed, unconfigured) = numbers.split_at(numbers.len() - 1);
    let mut want: Vec<u16> = DenialReason::ALL.iter().map(|r| r.status()).collect();
    want.sort_unstable();
    want.dedup();
    assert_eq!(listed, want.as_slice(), "{text}");
    assert_eq!(unconfigured, [keyswap_policy::Unconfigured::STATUS], "{text}");
    assert!(text.contains(keyswap_policy::Unconfigured::CODE), "{text}");
    let codes = wit.find("/// The stable error code").expect("the code list");
    let listed: Vec<&str> =
        wit[codes..].split("code: string").next().unwrap_or_default().split('`').skip(1).step_by(2).collect();
    assert!(listed.len() >= 5, "{listed:?}");
    for code in listed.iter().filter(|c| !c.contains(' ') && *c != &"error") {
        assert!(DenialReason::ALL.iter().any(|r| r.code() == *code), "the WIT names `{code}`, which no denial has");
    }
}
