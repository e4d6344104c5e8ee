//! The two wasm artifacts the harness runs, both built from this
//! workspace: the proxy-wasm filter module (what Envoy loads) and the
//! policy component. [`Artifact`] says where each is, how it is built, and
//! reads it, so a missing file is reported the same way for both, with the
//! command that builds it.

use std::path::{Path, PathBuf};

use wasmtime::{Cache, CacheConfig, Config, Engine};

/// A wasm artifact this workspace builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// `keyswap_filter.wasm`: the proxy-wasm filter, `wasm32-wasip1`.
    Filter,
    /// `keyswap_component.wasm`: the policy component, `wasm32-wasip2`.
    Component,
}

impl Artifact {
    /// What it is called in messages.
    pub const fn what(self) -> &'static str {
        match self {
            Self::Filter => "the filter module",
            Self::Component => "the component",
        }
    }

    /// The variable that points at another build of it.
    pub const fn env_var(self) -> &'static str {
        match self {
            Self::Filter => "KEYSWAP_FILTER",
            Self::Component => "KEYSWAP_COMPONENT",
        }
    }

    /// The CLI flag that points at another build of it.
    pub const fn flag(self) -> &'static str {
        match self {
            Self::Filter => "--filter",
            Self::Component => "--component",
        }
    }

    /// The Rust target it is built for.
    pub const fn target(self) -> &'static str {
        match self {
            Self::Filter => "wasm32-wasip1",
            Self::Component => "wasm32-wasip2",
        }
    }

    /// The package that builds it.
    pub const fn package(self) -> &'static str {
        match self {
            Self::Filter => "keyswap-filter",
            Self::Component => "keyswap-component",
        }
    }

    /// Its file name under `target/<target>/release/`.
    pub const fn file_name(self) -> &'static str {
        match self {
            Self::Filter => "keyswap_filter.wasm",
            Self::Component => "keyswap_component.wasm",
        }
    }

    /// The command that builds it into [`Self::workspace_path`], from the
    /// workspace root. The filter's is `scripts/build-filter`, the one
    /// owner of how the release filter is built (`cargo build --profile filter`,
    /// then `wasm-opt -Oz`), so what the harness runs is what Envoy loads.
    pub fn build_command(self) -> String {
        match self {
            Self::Filter => "scripts/build-filter".to_string(),
            Self::Component => format!("cargo build --release --target {} -p {}", self.target(), self.package()),
        }
    }

    /// Its place in this workspace's `target/`.
    pub fn workspace_path(self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(self.target())
            .join("release")
            .join(self.file_name())
    }

    /// Where the harness looks for it: [`Self::env_var`] if set and not
    /// empty, else [`Self::workspace_path`].
    pub fn default_path(self) -> PathBuf {
        match std::env::var_os(self.env_var()) {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => self.workspace_path(),
        }
    }

    /// Reads the artifact at `path`.
    ///
    /// # Errors
    /// [`ArtifactError::Missing`] (saying how to build it), or any other
    /// read error.
    pub fn read(self, path: &Path) -> Result<Vec<u8>, ArtifactError> {
        std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ArtifactError::Missing { artifact: self, path: path.to_path_buf() },
            _ => ArtifactError::Read { path: path.to_path_buf(), source },
        })
    }
}

/// The engine both artifacts are compiled with: wasmtime's defaults, and
/// its on-disk cache of compiled code (`~/.cache/wasmtime`, keyed by the
/// module's bytes and the compiler's settings), so a `keyswap` command
/// compiles a given build once, not on every run. Without a usable cache
/// directory it compiles every time, as before.
///
/// # Errors
/// An engine wasmtime cannot make for this machine.
pub fn engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    if let Ok(cache) = Cache::new(CacheConfig::new()) {
        config.cache(Some(cache));
    }
    Engine::new(&config)
}

/// An artifact that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(
        "{} {} does not exist; build it with `{}` from the workspace root (after `rustup target add {}`), \
         or point {} / {} at a built {}",
        artifact.what(), path.display(), artifact.build_command(), artifact.target(),
        artifact.flag(), artifact.env_var(), artifact.file_name()
    )]
    Missing { artifact: Artifact, path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
}
