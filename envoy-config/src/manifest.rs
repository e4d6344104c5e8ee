//! Kubernetes manifests for one keyswap configuration, for Istio and for
//! Envoy Gateway: what `keyswap manifest` prints for `kubectl apply`.
//!
//! keyswap runs in two stages with one configuration (docs/config.md,
//! "Where keyswap runs in Envoy"): the listener's HTTP filter and an
//! upstream HTTP filter on every cluster a route is bound to. Neither
//! control plane has an API for the second, so each platform gets its
//! listener resource plus a patch of exactly the bound clusters, made here
//! from the configuration itself so the two can never disagree:
//!
//! - Istio: a `WasmPlugin` (listener stage, delivered by ECDS) and an
//!   `EnvoyFilter` whose `CLUSTER` patches put the same ECDS resource in
//!   each bound cluster: one resource, one configuration, one `apply`.
//! - Envoy Gateway: an `EnvoyExtensionPolicy` (listener stage, inline in
//!   the listener) and an `EnvoyPatchPolicy` whose JSON patches give each
//!   bound cluster the final stage with the same configuration.
//!
//! The end-to-end tests run these manifests in Envoy
//! (`tests/tests/all/platforms.rs`). Pure: text in, JSON values out ([`to_stream`] renders them). No file, no
//! wasmtime, no network.

use keyswap_policy::Policy;
use serde_json::{json, Value};

use crate::ecds::{env_names, WASM_TYPE};

/// Istio's agent answers a plugin it cannot fetch (with `FAIL_CLOSE`) with
/// an RBAC deny-all of this type, so every reference to the plugin's ECDS
/// resource accepts it (Envoy 1.40 runs it as an upstream filter too).
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const STRING_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
const PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const PROTOCOL_OPTIONS_TYPE: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const CODEC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const GATEWAY_API: &str = "gateway.networking.k8s.io";

/// What every platform's manifest names.
#[derive(Debug, Clone)]
pub struct Common {
    /// The name of the listener resource (`WasmPlugin`,
    /// `EnvoyExtensionPolicy`); the cluster patch is `<name>-upstream`.
    pub name: String,
    /// Their namespace.
    pub namespace: String,
    /// The plugin image (`oci://…` for Istio, a registry reference for
    /// Envoy Gateway), as `scripts/image` builds it.
    pub image: String,
}

/// Where the Istio plugin runs, and how that release names its ECDS
/// resource.
#[derive(Debug, Clone)]
pub struct Istio {
    pub common: Common,
    /// The gateway pods' label, `KEY=VALUE` (a gateway of keyswap's own:
    /// the plugin takes every request of the pods it selects).
    pub selector: (String, String),
    /// Istio's minor release (`1.29` → 29).
    pub minor: u32,
}

/// The Envoy Gateway resources keyswap attaches to.
#[derive(Debug, Clone)]
pub struct EnvoyGateway {
    pub common: Common,
    /// The HTTPRoutes (in `common.namespace`) whose requests the listener
    /// stage reads.
    pub routes: Vec<String>,
    /// The Gateway whose clusters are patched, in `common.namespace`.
    pub gateway: String,
    /// Where the Envoy pods find the filter module for the cluster stage
    /// (`envoyproxy.yaml` mounts it from a ConfigMap).
    pub module_path: String,
}

/// How long a gateway's cluster waits for the plugin's ECDS resource
/// before it runs without it (and so answers 500).
pub const ISTIO_FETCH_TIMEOUT: &str = "15s";

/// The oldest and newest Istio releases the manifests are made for.
pub const ISTIO_MINORS: std::ops::RangeInclusive<u32> = 19..=31;

/// A configuration or an option the manifests cannot be made from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// keyswap refuses the configuration (the field and why, never a value).
    #[error("the configuration is refused: {0}")]
    Config(#[from] keyswap_policy::ConfigError),
    /// Nothing to patch: a final stage on no cluster sets no credential.
    #[error("no route is bound to a cluster (`match.clusters`): there is nothing to deploy")]
    NoClusters,
    /// A command-line choice the manifests cannot be made for (an Istio
    /// release out of range, no HTTPRoute).
    #[error("{0}")]
    Unsupported(String),
}

/// What the manifests need from a configuration: its JSON, the clusters
/// its routes are bound to, and the environment variables it reads.
struct Inspected {
    config: Value,
    clusters: Vec<String>,
    env: Vec<String>,
}

/// Compiles `config` as the filter would, every variable it names
/// ([`env_names`], as `keyswap push` checks it) set to a placeholder, so a
/// manifest is never made from a configuration keyswap would refuse.
fn inspect(config: &str) -> Result<Inspected, ManifestError> {
    let value: Value = serde_json::from_str(config).unwrap_or_default();
    let env = env_names(&value);
    let lookup = |name: &str| env.iter().any(|n| n == name).then(|| "manifest-placeholder".to_string());
    // A document that is not JSON is refused here, with the policy's words.
    let policy = Policy::from_json(config.as_bytes(), &lookup)?;
    let clusters = policy.bound_clusters().to_vec();
    if clusters.is_empty() {
        return Err(ManifestError::NoClusters);
    }
    Ok(Inspected { config: value, clusters, env })
}

/// The name under which this Istio release serves a WasmPlugin's ECDS
/// resource, which the cluster patch must reference exactly (read from
/// istio/istio `pilot/pkg/model/extensions.go` at each release tag):
///
/// | Istio | ECDS resource of WasmPlugin `ns/name` |
/// |---|---|
/// | 1.19-1.20 | `ns.name` |
/// | 1.21-1.25 | `extenstions.istio.io/wasmplugin/ns.name` (sic) |
/// | 1.26-1.29 | `extensions.istio.io/wasmplugin/ns.name` |
/// | 1.30- | `extensions.istio.io/trafficextension/ns.name~istio-translated-wasmplugin` |
///
/// A wrong name fails closed: Envoy answers 500 on a cluster whose
/// upstream filter never receives its configuration.
///
/// # Errors
/// A release outside [`ISTIO_MINORS`].
pub fn istio_ecds_name(minor: u32, namespace: &str, name: &str) -> Result<String, ManifestError> {
    let plugin = format!("{namespace}.{name}");
    match minor {
        19..=20 => Ok(plugin),
        21..=25 => Ok(format!("extenstions.istio.io/wasmplugin/{plugin}")),
        26..=29 => Ok(format!("extensions.istio.io/wasmplugin/{plugin}")),
        30..=31 => Ok(format!("extensions.istio.io/trafficextension/{plugin}~istio-translated-wasmplugin")),
        _ => Err(ManifestError::Unsupported(format!(
            "Istio 1.{minor} is not supported: keyswap's manifests are made for Istio 1.{}-1.{}",
            ISTIO_MINORS.start(),
            ISTIO_MINORS.end()
        ))),
    }
}

fn metadata(name: &str, namespace: &str) -> Value {
    json!({"name": name, "namespace": namespace})
}

/// The cluster's upstream HTTP filters: keyswap's final stage, then the
/// codec Envoy requires last.
fn upstream_protocol_options(keyswap: Value) -> Value {
    json!({
        PROTOCOL_OPTIONS: {
            "@type": PROTOCOL_OPTIONS_TYPE,
            // Required whenever the options are set. HTTP/1.1 is what the
            // clusters use when neither control plane sets options; a
            // cluster that needs HTTP/2 or timeouts gets them here (the
            // patch replaces the control plane's options, docs/deploy).
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": [
                keyswap,
                {"name": "envoy.filters.http.upstream_codec", "typed_config": {"@type": CODEC_TYPE}},
            ],
        }
    })
}

/// keyswap on the Istio gateway pods `opts.selector` picks: a `WasmPlugin`
/// and an `EnvoyFilter` (the final stage on each bound cluster, by the
/// plugin's own ECDS resource; the gateway's refusal of header names with
/// `_`).
///
/// # Errors
/// A configuration keyswap refuses or binds to no cluster; an unsupported
/// Istio release.
pub fn istio(config: &str, opts: &Istio) -> Result<Vec<Value>, ManifestError> {
    let seen = inspect(config)?;
    let Common { name, namespace, image } = &opts.common;
    let ecds = istio_ecds_name(opts.minor, namespace, name)?;
    let (label, value) = &opts.selector;
    let env: Vec<Value> = seen.env.iter().map(|n| json!({"name": n, "valueFrom": "HOST"})).collect();
    let plugin = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": metadata(name, namespace),
        "spec": {
            "selector": {"matchLabels": {label: value}},
            "url": image,
            "imagePullPolicy": "IfNotPresent",
            "phase": "AUTHN",
            "failStrategy": "FAIL_CLOSE",
            "vmConfig": {"env": env},
            "pluginConfig": seen.config,
        },
    });
    let keyswap = json!({
        "name": ecds,
        "config_discovery": {
            // The gateway asks istiod for the resource over ADS, as Istio's
            // own reference does, but waits for it at most 15 s: a name
            // istiod does not serve (manifests made for another release)
            // then leaves the cluster answering 500, where Istio's `0s`
            // (wait forever) would keep a new gateway pod from starting.
            "config_source": {"ads": {}, "initial_fetch_timeout": ISTIO_FETCH_TIMEOUT, "resource_api_version": "V3"},
            "type_urls": [WASM_TYPE, RBAC_TYPE],
        },
    });
    let mut patches: Vec<Value> = seen
        .clusters
        .iter()
        .map(|cluster| {
            json!({
                "applyTo": "CLUSTER",
                "match": {"context": "GATEWAY", "cluster": {"name": cluster}},
                "patch": {
                    "operation": "MERGE",
                    "value": {"typed_extension_protocol_options": upstream_protocol_options(keyswap.clone())},
                },
            })
        })
        .collect();
    patches.push(json!({
        "applyTo": "NETWORK_FILTER",
        "match": {
            "context": "GATEWAY",
            "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}},
        },
        "patch": {
            "operation": "MERGE",
            "value": {
                "typed_config": {
                    "@type": HCM_TYPE,
                    "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
                },
            },
        },
    }));
    let filter = json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": metadata(&format!("{name}-upstream"), namespace),
        "spec": {"workloadSelector": {"labels": {label: value}}, "configPatches": patches},
    });
    Ok(vec![plugin, filter])
}

/// keyswap on an Envoy Gateway: an `EnvoyExtensionPolicy` on
/// `opts.routes` and an `EnvoyPatchPolicy` giving each bound cluster
/// (`httproute/<namespace>/<name>/rule/<index>`) the final stage.
///
/// # Errors
/// A configuration keyswap refuses or binds to no cluster; no HTTPRoute.
pub fn envoy_gateway(config: &str, opts: &EnvoyGateway) -> Result<Vec<Value>, ManifestError> {
    let seen = inspect(config)?;
    if opts.routes.is_empty() {
        return Err(ManifestError::Unsupported("name at least one HTTPRoute (--route)".into()));
    }
    let Common { name, namespace, image } = &opts.common;
    let target = |kind: &str, target: &str| json!({"group": GATEWAY_API, "kind": kind, "name": target});
    let policy = json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyExtensionPolicy",
        "metadata": metadata(name, namespace),
        "spec": {
            "targetRefs": opts.routes.iter().map(|r| target("HTTPRoute", r)).collect::<Vec<_>>(),
            "wasm": [{
                "name": name,
                "code": {"type": "Image", "image": {"url": image}},
                "failOpen": false,
                "env": {"hostKeys": seen.env},
                "config": seen.config,
            }],
        },
    });
    // The same configuration, byte for byte what the listener stage gets
    // (Envoy Gateway passes `config` on as its JSON text).
    let text = seen.config.to_string();
    let keyswap = json!({
        "name": name,
        "typed_config": {
            "@type": WASM_TYPE,
            "config": {
                "name": name,
                "configuration": {"@type": STRING_TYPE, "value": text},
                "fail_open": false,
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": opts.module_path}},
                    "environment_variables": {"host_env_keys": seen.env},
                },
            },
        },
    });
    let options = upstream_protocol_options(keyswap);
    let patches: Vec<Value> = seen
        .clusters
        .iter()
        .map(|cluster| {
            json!({
                "type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                "name": cluster,
                "operation": {"op": "add", "path": "/typed_extension_protocol_options", "value": options},
            })
        })
        .collect();
    let patch = json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyPatchPolicy",
        "metadata": metadata(&format!("{name}-upstream"), namespace),
        "spec": {"targetRef": target("Gateway", &opts.gateway), "type": "JSONPatch", "jsonPatches": patches},
    });
    Ok(vec![policy, patch])
}

/// The largest object `kubectl apply` (client-side) can write: its whole
/// JSON goes into the `last-applied-configuration` annotation, and all
/// annotations of an object together may hold 256 KiB.
pub const CLIENT_SIDE_LIMIT: usize = 256 * 1024;
/// The largest object etcd stores (its default request limit, 1.5 MiB),
/// less room for what the API server adds (managed fields, status).
pub const SERVER_SIDE_LIMIT: usize = 1_536 * 1024 - 16 * 1024;

/// How each document fits the two ways of applying it: one line per
/// document that does not fit client-side or at all.
pub fn size_warnings(docs: &[Value]) -> Vec<String> {
    let mut warnings = Vec::new();
    for doc in docs {
        let size = serde_json::to_vec(doc).map(|b| b.len()).unwrap_or(usize::MAX);
        let kind = doc["kind"].as_str().unwrap_or("object");
        if size > SERVER_SIDE_LIMIT {
            warnings.push(format!(
                "{kind} is {size} bytes: more than Kubernetes stores in one object (~{SERVER_SIDE_LIMIT}); \
                 deliver this configuration another way (docs/operations.md, \"How many clients fit\")"
            ));
        } else if size > CLIENT_SIDE_LIMIT {
            warnings.push(format!(
                "{kind} is {size} bytes: too large for client-side `kubectl apply` ({CLIENT_SIDE_LIMIT}); \
                 use `kubectl apply --server-side`"
            ));
        }
    }
    warnings
}

/// [`size_warnings`] for the manifests `config` makes on each platform
/// with default names (none when it binds no cluster): what `keyswap
/// check` prints.
pub fn delivery_warnings(config: &str) -> Vec<String> {
    let common = |namespace: &str| Common {
        name: "keyswap".into(),
        namespace: namespace.into(),
        image: "registry.example.com/keyswap/filter:0.1.0".into(),
    };
    let istio_docs = istio(
        config,
        &Istio { common: common("istio-system"), selector: ("istio".into(), "keyswap-gateway".into()), minor: 29 },
    );
    let eg_docs = envoy_gateway(
        config,
        &EnvoyGateway {
            common: common("default"),
            routes: vec!["api".into()],
            gateway: "eg".into(),
            module_path: "/etc/keyswap/plugin.wasm".into(),
        },
    );
    [istio_docs, eg_docs].into_iter().flatten().flat_map(|docs| size_warnings(&docs)).collect()
}

/// The documents as one YAML stream for `kubectl apply -f`: `header`
/// (comment lines), then each document as JSON after `---`. JSON is YAML,
/// and every string in it is quoted, so no YAML reader takes a value for
/// another type (an unquoted `2027-06-30T00:00:00Z` is a timestamp to
/// YAML 1.1 readers).
pub fn to_stream(docs: &[Value], header: &str) -> String {
    let mut out = String::from(header);
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(doc).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// `KEY=VALUE` for a label selector.
///
/// # Errors
/// Text without `=` or with an empty side.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

/// `1.29` → 29.
///
/// # Errors
/// Anything but `1.<minor>`.
pub fn parse_istio_version(text: &str) -> Result<u32, String> {
    text.strip_prefix("1.")
        .map(|m| m.split('.').next().unwrap_or(m))
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("`{text}` is not an Istio release like 1.29"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "clients": [{"id": "a", "key_sha256": "97558b8c36b68cce8881012c851e2bac285a1516e0e1202fc944e9df2970548c", "routes": ["openai"]}],
        "routes": [
            {"name": "openai", "match": {"clusters": ["outbound|443||api.openai.com"]},
             "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"env": "OPENAI_API_KEY"}}]},
            {"name": "github", "match": {"clusters": ["outbound|443||api.github.com", "outbound|443||api.openai.com"]},
             "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"env": "GITHUB_TOKEN"}}]}
        ],
        "unmatched_route": "pass"
    }"#;

    fn common() -> Common {
        Common { name: "keyswap".into(), namespace: "istio-system".into(), image: "oci://r/k:1".into() }
    }

    fn istio_opts(minor: u32) -> Istio {
        Istio { common: common(), selector: ("istio".into(), "keyswap-gateway".into()), minor }
    }

    #[test]
    fn istio_patches_each_bound_cluster_once_with_the_plugins_own_resource() {
        let docs = istio(CONFIG, &istio_opts(29)).unwrap();
        assert_eq!(docs[0]["kind"], "WasmPlugin");
        assert_eq!(
            docs[0]["spec"]["vmConfig"]["env"],
            json!([
            {"name": "GITHUB_TOKEN", "valueFrom": "HOST"}, {"name": "OPENAI_API_KEY", "valueFrom": "HOST"}])
        );
        let patches = docs[1]["spec"]["configPatches"].as_array().unwrap();
        let clusters: Vec<&str> = patches.iter().filter_map(|p| p["match"]["cluster"]["name"].as_str()).collect();
        assert_eq!(clusters, ["outbound|443||api.github.com", "outbound|443||api.openai.com"]);
        let filter =
            &patches[0]["patch"]["value"]["typed_extension_protocol_options"][PROTOCOL_OPTIONS]["http_filters"][0];
        assert_eq!(filter["name"], "extensions.istio.io/wasmplugin/istio-system.keyswap");
        assert_eq!(patches.last().unwrap()["applyTo"], "NETWORK_FILTER");
    }

    #[test]
    fn the_ecds_name_follows_the_istio_release() {
        assert_eq!(istio_ecds_name(19, "n", "p").unwrap(), "n.p");
        assert_eq!(istio_ecds_name(25, "n", "p").unwrap(), "extenstions.istio.io/wasmplugin/n.p");
        assert_eq!(istio_ecds_name(26, "n", "p").unwrap(), "extensions.istio.io/wasmplugin/n.p");
        assert_eq!(
            istio_ecds_name(30, "n", "p").unwrap(),
            "extensions.istio.io/trafficextension/n.p~istio-translated-wasmplugin"
        );
        assert!(istio_ecds_name(18, "n", "p").is_err());
        assert!(istio_ecds_name(32, "n", "p").is_err());
        assert_eq!(parse_istio_version("1.29.3"), Ok(29));
        assert!(parse_istio_version("2.0").is_err());
    }

    #[test]
    fn envoy_gateway_gives_both_stages_the_same_configuration() {
        let opts = EnvoyGateway {
            common: Common { name: "keyswap".into(), namespace: "default".into(), image: "r/k:1".into() },
            routes: vec!["api".into()],
            gateway: "eg".into(),
            module_path: "/etc/keyswap/plugin.wasm".into(),
        };
        let docs = envoy_gateway(CONFIG, &opts).unwrap();
        let listener = &docs[0]["spec"]["wasm"][0]["config"];
        let patches = docs[1]["spec"]["jsonPatches"].as_array().unwrap();
        assert_eq!(patches.len(), 2);
        let value = &patches[0]["operation"]["value"][PROTOCOL_OPTIONS]["http_filters"][0]["typed_config"]["config"]
            ["configuration"]["value"];
        let cluster: Value = serde_json::from_str(value.as_str().unwrap()).unwrap();
        assert_eq!(&cluster, listener);
        assert_eq!(docs[0]["spec"]["wasm"][0]["env"]["hostKeys"], json!(["GITHUB_TOKEN", "OPENAI_API_KEY"]));
    }

    #[test]
    fn refused_or_unbound_configurations_make_no_manifest() {
        let refused = istio(r#"{"clients": [], "routes": [{"name": "x"}]}"#, &istio_opts(29));
        assert!(matches!(refused, Err(ManifestError::Config(_))), "{refused:?}");
        let unbound = istio(r#"{"refuse_all": true}"#, &istio_opts(29));
        assert_eq!(unbound, Err(ManifestError::NoClusters));
    }

    #[test]
    fn size_warnings_name_the_limit_crossed() {
        let doc = |n: usize| json!({"kind": "WasmPlugin", "spec": {"pad": "x".repeat(n)}});
        assert!(size_warnings(&[doc(1000)]).is_empty());
        assert!(size_warnings(&[doc(CLIENT_SIDE_LIMIT)])[0].contains("--server-side"));
        assert!(size_warnings(&[doc(SERVER_SIDE_LIMIT)])[0].contains("more than Kubernetes stores"));
    }
}
