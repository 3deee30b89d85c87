//! Build script: stamps the git commit into `--version`, so a bug report or a package names
//! the exact source it was built from.
//!
//! The commit comes from `LMP_GIT_COMMIT` when set (a build from an exported tree, which
//! has no `.git`), else from `git rev-parse`, else it is "unknown". Uncommitted edits are
//! not marked: telling them apart would mean re-running git on every build.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=LMP_GIT_COMMIT");
    let commit = match std::env::var("LMP_GIT_COMMIT") {
        Ok(commit) if !commit.is_empty() => commit,
        _ => from_git().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=LMP_GIT_COMMIT={commit}");
}

fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Rebuild when HEAD moves: a new commit, a checkout, or a change of branch. Which files
    // record that depends on worktrees and packed refs, so ask git for each path.
    for path in ["HEAD", "packed-refs"] {
        watch(git(&["rev-parse", "--git-path", path]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(git(&["rev-parse", "--git-path", &branch]));
    }
    Some(commit)
}

fn watch(path: Option<String>) {
    if let Some(path) = path {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
