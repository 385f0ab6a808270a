//! What was built: version, commit and commit date. The binary sets them at start
//! ([`set`]) from what its build script found; libraries read them ([`get`]) for `build_info`.

use std::sync::OnceLock;

/// Version, commit and commit date of the running build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// The crate version (`0.1.0`).
    pub version: &'static str,
    /// The git commit (12 hex digits), or `unknown`.
    pub commit: &'static str,
    /// The commit's date (RFC 3339), or `unknown`.
    pub date: &'static str,
}

impl std::fmt::Display for BuildInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (commit {}, {})", self.version, self.commit, self.date)
    }
}

static BUILD: OnceLock<BuildInfo> = OnceLock::new();

/// Record the running build (once; later calls change nothing).
pub fn set(info: BuildInfo) {
    let _ = BUILD.set(info);
}

/// The running build: what [`set`] recorded, else this crate's version with an unknown commit.
pub fn get() -> &'static BuildInfo {
    BUILD.get_or_init(|| BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: "unknown",
        date: "unknown",
    })
}
