//! Writes the man pages and shell completions of `legacy-mail-proxy` from its clap
//! definitions, so they cannot drift from `--help`. Run by the package build
//! (debian/rules): `cargo run --example gen-docs -- OUT_DIR`.
//!
//! OUT_DIR gets `man/legacy-mail-proxy.8` and one page per subcommand
//! (`legacy-mail-proxy-pop3.8`, `legacy-mail-proxy-oauth2-authorize.8`, …), and
//! `bash/legacy-mail-proxy`, `zsh/_legacy-mail-proxy`, `fish/legacy-mail-proxy.fish`,
//! named as Debian's completion directories expect them.
//!
//! An example, not a binary: clap_mangen and clap_complete are then dev-dependencies,
//! built for the package and the tests but never linked into the gateway.

use clap::CommandFactory;
use clap_complete::Shell;
use legacy_mail_proxy::cli::{Cli, VERSION};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Section 8: the gateway is run by inetd/systemd and set up by the admin.
const SECTION: &str = "8";

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen-docs OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-docs: {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &Path) -> std::io::Result<()> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Gives every subcommand its display name ("legacy-mail-proxy-pop3"), which names
    // its page and its `SEE ALSO`-style references.
    cmd.build();
    let man = out.join("man");
    fs::create_dir_all(&man)?;
    man_pages(&cmd, &man)?;

    for (shell, dir, file) in [
        (Shell::Bash, "bash", "legacy-mail-proxy"),
        (Shell::Zsh, "zsh", "_legacy-mail-proxy"),
        (Shell::Fish, "fish", "legacy-mail-proxy.fish"),
    ] {
        let dir = out.join(dir);
        fs::create_dir_all(&dir)?;
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "legacy-mail-proxy", &mut text);
        fs::write(dir.join(file), text)?;
    }
    Ok(())
}

fn man_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .source(format!("legacy-mail-proxy {VERSION}"))
        .manual("System Administration");
    let mut text = Vec::new();
    page.render(&mut text)?;
    fs::write(dir.join(page.get_filename()), text)
}
