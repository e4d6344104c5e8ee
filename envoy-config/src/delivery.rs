//! How large a configuration each way of delivering it to Envoy carries,
//! and whether one fits: what `keyswap check` prints (docs/operations.md,
//! "How many clients fit").
//!
//! ```text
//! the ECDS file (keyswap push)  no limit of its own; the time to apply grows with it
//! a gRPC xDS stream             4 MiB per message by gRPC's default (the DiscoveryResponse)
//! a Kubernetes object           ~1.5 MiB (etcd), 256 KiB for client-side kubectl apply
//! a ConfigMap                   1 MiB of data
//! ```
//!
//! The Kubernetes limits of the manifests themselves are [`crate::manifest`]'s.

use crate::{ecds, manifest};

/// gRPC's default largest message a receiver accepts: 4 MiB
/// (`GRPC_DEFAULT_MAX_RECV_MESSAGE_LENGTH` in gRPC core, which Envoy's
/// `google_grpc` client uses; grpc-go's `defaultServerMaxReceiveMessageSize`
/// and grpc-java's `DEFAULT_MAX_MESSAGE_SIZE` are the same). One ECDS
/// `DiscoveryResponse` carries the whole configuration.
pub const GRPC_DEFAULT_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// The most data a ConfigMap may hold (Kubernetes `MaxSecretSize`, which
/// ConfigMap validation uses too: 1 MiB).
pub const CONFIGMAP_LIMIT: usize = 1024 * 1024;

/// A configuration's size as each delivery path carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// The keyswap JSON itself (a ConfigMap's or a Secret's data).
    pub config: usize,
    /// The ECDS file `keyswap push` writes as JSON (`.json`).
    pub ecds_json: usize,
    /// The ECDS file as binary protobuf (`.pb`): also the size of the
    /// `DiscoveryResponse` a gRPC control plane would send.
    pub ecds_binary: usize,
}

/// The sizes of `config` with `envoy.yaml`'s `vm_config`.
pub fn sizes(config: &str) -> Sizes {
    let vm = ecds::VmConfig::Json(ecds::default_vm_config());
    let len = |format| ecds::encode(format, config, &vm).map_or(0, |b| b.len());
    Sizes { config: config.len(), ecds_json: len(ecds::Format::Json), ecds_binary: len(ecds::Format::Binary) }
}

/// `1.2 MiB`, `340.0 KiB` or `512 bytes`.
pub fn human(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    } else if bytes >= 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} bytes")
    }
}

/// The line `keyswap check` prints about the size.
pub fn size_line(sizes: &Sizes) -> String {
    let exact = if sizes.config < 1024 {
        human(sizes.config)
    } else {
        format!("{} bytes ({})", sizes.config, human(sizes.config))
    };
    format!(
        "size: {exact}; as an ECDS file: {} as binary protobuf (.pb), {} as JSON",
        human(sizes.ecds_binary),
        human(sizes.ecds_json)
    )
}

/// One warning per common limit `config` does not fit: a ConfigMap, a
/// gRPC xDS message, and the manifests `keyswap manifest` makes
/// ([`manifest::delivery_warnings`]). None for a small configuration.
pub fn warnings(config: &str) -> Vec<String> {
    let mut out = limit_warnings(&sizes(config));
    out.extend(manifest::delivery_warnings(config));
    out
}

/// The ConfigMap and gRPC lines of [`warnings`], from the sizes alone.
pub fn limit_warnings(sizes: &Sizes) -> Vec<String> {
    let mut out = Vec::new();
    if sizes.config > CONFIGMAP_LIMIT {
        out.push(format!(
            "the configuration is {}: more than a ConfigMap or Secret holds ({}); mount it another way",
            human(sizes.config),
            human(CONFIGMAP_LIMIT)
        ));
    }
    if sizes.ecds_binary > GRPC_DEFAULT_MAX_MESSAGE {
        out.push(format!(
            "its ECDS resource is {}: more than gRPC's default largest message ({}), so a control plane \
             cannot send it over xDS unless both its gRPC server and Envoy's gRPC client allow larger \
             messages (the ECDS file keyswap push writes has no such limit)",
            human(sizes.ecds_binary),
            human(GRPC_DEFAULT_MAX_MESSAGE)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` clients by digest on one route bound to one cluster.
    fn config(n: usize) -> String {
        let clients: Vec<String> =
            (0..n).map(|i| format!(r#"{{"id": "c{i}", "key_sha256": "{:064x}", "routes": ["r"]}}"#, i + 1)).collect();
        format!(
            r#"{{"clients": [{}], "routes": [{{"name": "r", "match": {{"clusters": ["c"]}}, "inject": [{{"header": "x", "value": {{"env": "E"}}}}]}}]}}"#,
            clients.join(",")
        )
    }

    #[test]
    fn sizes_are_measured_and_binary_is_the_smallest_file() {
        let text = config(100);
        let s = sizes(&text);
        assert_eq!(s.config, text.len());
        assert!(s.config < s.ecds_binary && s.ecds_binary < s.ecds_json, "{s:?}");
        assert!(size_line(&s).starts_with(&format!("size: {} bytes (", text.len())), "{}", size_line(&s));
        assert!(size_line(&sizes("{}")).starts_with("size: 2 bytes; as an ECDS file: "));
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn each_limit_crossed_is_named() {
        // The manifests' own limits are manifest.rs's tests and the CLI's.
        assert!(warnings(&config(10)).is_empty());
        let at = |config, ecds_binary| limit_warnings(&Sizes { config, ecds_json: ecds_binary, ecds_binary });
        assert!(at(CONFIGMAP_LIMIT, CONFIGMAP_LIMIT + 300).is_empty(), "1 MiB fits a ConfigMap");
        let w = at(CONFIGMAP_LIMIT + 1, CONFIGMAP_LIMIT + 300);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("more than a ConfigMap or Secret holds (1.0 MiB)"), "{w:?}");
        let w = at(GRPC_DEFAULT_MAX_MESSAGE, GRPC_DEFAULT_MAX_MESSAGE + 1);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[1].contains("gRPC's default largest message (4.0 MiB)"), "{w:?}");
    }
}
