//! Errors by boundary: loading the module, the ABI it exposes, a trap in a
//! callback, and a configuration the filter refused (which is an answer,
//! but one that leaves no instance to use).

use crate::artifact::ArtifactError;

/// Anything that keeps the harness from running the filter.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The module's file is missing (the message says how to build it)
    /// or unreadable.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("cannot compile the module: {0}")]
    Compile(String),
    #[error("cannot link the module: {0}")]
    Link(String),
    /// The module does not expose the proxy-wasm ABI as expected.
    #[error("not a usable proxy-wasm module: {0}")]
    Abi(String),
    /// A callback trapped; `log` is everything the guest logged so far
    /// (a panic hook's line lands there).
    #[error("{callback} trapped: {message}\nguest log:\n{log}")]
    Trap { callback: &'static str, message: String, log: String },
    /// `proxy_on_vm_start` returned false.
    #[error("the VM refused to start; guest log:\n{log}")]
    VmRefused { log: String },
    /// `proxy_on_configure` returned false; `log` is what the filter logged.
    #[error("the configuration was refused:\n{log}")]
    Refused { log: String },
    /// `response` was called with no forwarded request open.
    #[error("no forwarded request is open for a response")]
    NoOpenRequest,
}
