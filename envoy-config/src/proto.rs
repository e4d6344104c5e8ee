//! The few Envoy protobuf messages of a binary (`.pb`) ECDS file, declared
//! by hand for prost's derive: no `.proto` files, no protoc, no build
//! script. Field numbers are Envoy's (`api/envoy/...` in envoyproxy/envoy;
//! `google/protobuf/{any,wrappers}.proto` for the well-known types); each
//! message declares only the fields keyswap writes or reads, and prost
//! skips the others when it decodes.
//!
//! ```text
//! DiscoveryResponse          envoy.service.discovery.v3 (discovery.proto)
//!  └ resources[]: Any ─▶ TypedExtensionConfig   envoy.config.core.v3 (extension.proto)
//!      └ typed_config: Any ─▶ Wasm               envoy.extensions.filters.http.wasm.v3
//!          └ config: PluginConfig               envoy.extensions.wasm.v3 (wasm.proto)
//!              ├ configuration: Any ─▶ StringValue (the keyswap JSON)
//!              └ vm_config: VmConfig            kept as its encoded bytes
//! ```
//!
//! `PluginConfig.vm_config` is declared as bytes: a push copies the file's
//! `vm_config` byte for byte, whatever fields it holds. [`VmConfig`]
//! declares the fields `envoy.yaml` uses, to convert a JSON `vm_config`.

use std::collections::BTreeMap;

/// prost's trait of these messages (`encode_to_vec`, `decode`), for
/// users of this module without a prost dependency of their own.
pub use prost::Message;

/// `envoy.service.discovery.v3.DiscoveryResponse`: what Envoy's
/// `path_config_source` reads from the file (`FilesystemSubscriptionImpl`
/// with `MessageUtil::loadFromFile`, binary when the name ends in `.pb`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct DiscoveryResponse {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `envoy.config.core.v3.TypedExtensionConfig`: one ECDS resource.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypedExtensionConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub typed_config: Option<Any>,
}

/// `envoy.extensions.filters.http.wasm.v3.Wasm`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Wasm {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PluginConfig>,
}

/// `envoy.extensions.wasm.v3.PluginConfig`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginConfig {
    #[prost(string, tag = "1")]
    pub name: String,
    /// `vm_config` (a `VmConfig` message, in the `vm` oneof), encoded.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub vm_config: Option<Vec<u8>>,
    #[prost(message, optional, tag = "4")]
    pub configuration: Option<Any>,
}

/// `google.protobuf.StringValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StringValue {
    #[prost(string, tag = "1")]
    pub value: String,
}

/// `envoy.extensions.wasm.v3.VmConfig`: the fields a JSON `vm_config` can
/// be converted from (`code.remote` and `configuration` cannot).
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmConfig {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub runtime: String,
    #[prost(message, optional, tag = "3")]
    pub code: Option<AsyncDataSource>,
    #[prost(bool, tag = "5")]
    pub allow_precompiled: bool,
    #[prost(bool, tag = "6")]
    pub nack_on_code_cache_miss: bool,
    #[prost(message, optional, tag = "7")]
    pub environment_variables: Option<EnvironmentVariables>,
}

/// `envoy.config.core.v3.AsyncDataSource` (its `local` side).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AsyncDataSource {
    #[prost(message, optional, tag = "1")]
    pub local: Option<DataSource>,
}

/// `envoy.config.core.v3.DataSource`: a oneof, each member optional here.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DataSource {
    #[prost(string, optional, tag = "1")]
    pub filename: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub inline_bytes: Option<Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    pub inline_string: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub environment_variable: Option<String>,
}

/// `envoy.extensions.wasm.v3.EnvironmentVariables`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnvironmentVariables {
    #[prost(string, repeated, tag = "1")]
    pub host_env_keys: Vec<String>,
    #[prost(btree_map = "string, string", tag = "2")]
    pub key_values: BTreeMap<String, String>,
}
