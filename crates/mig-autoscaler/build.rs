//! The commit and its date, for `mig-autoscaler version`, `--version` and `build_info`: from git
//! when built in a checkout, else from `MIG_AUTOSCALER_COMMIT` / `MIG_AUTOSCALER_COMMIT_DATE`
//! (an image build without `.git`), else `unknown`. The commit's date rather than the build's
//! time, so that a build is reproducible.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    for (key, args) in [
        ("MIG_AUTOSCALER_COMMIT", &["rev-parse", "--short=12", "HEAD"][..]),
        ("MIG_AUTOSCALER_COMMIT_DATE", &["log", "-1", "--format=%cI"][..]),
    ] {
        println!("cargo:rerun-if-env-changed={key}");
        let value = std::env::var(key)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| git(args))
            .unwrap_or_else(|| "unknown".into());
        println!("cargo:rustc-env={key}={value}");
    }
    // A new commit (HEAD moves, or the branch it names does) rebuilds this crate only.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head}");
        }
        println!("cargo:rerun-if-changed={dir}/packed-refs");
    }
}
