//! The Debian package and what it is made from: `--version` naming the commit, the man
//! pages and completions generated from the clap definitions, and the `.deb` built by
//! `packaging/build-deb` (its files, conffiles, maintainer scripts and lintian).

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn version_names_the_git_commit() {
    let head = run(Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo()));
    let version = run(Command::new(env!("CARGO_BIN_EXE_legacy-mail-proxy")).arg("--version"));
    assert_eq!(
        version.trim(),
        format!(
            "legacy-mail-proxy {} (git {})",
            env!("CARGO_PKG_VERSION"),
            head.trim()
        )
    );
    // Every subcommand says the same (propagate_version).
    let pop3 =
        run(Command::new(env!("CARGO_BIN_EXE_legacy-mail-proxy")).args(["pop3", "--version"]));
    assert!(pop3.contains(head.trim()), "{pop3}");
}
