//! `pop3 --auth oauth2` and `smtp --smtp-oauth2-account` through the real binary, against
//! the real Dovecot and Postfix of the harness: what the client hears and what the admin
//! reads when the OAuth2 account cannot give a token.
//!
//! The cases that need tokens a real authorization server issued (a POP3 download and an
//! SMTP send with a token, expiry between and during sessions, 20 sessions at the moment
//! of expiry, a revoked refresh token, the provider down) need the OAuth2 Dovecot/Postfix
//! and authorization server of the o2srv branch of issue 10; they go here once it is
//! merged.

mod common;

use common::{postfix, servers};
use std::path::{Path, PathBuf};

/// A token store of this test's own: `None` leaves it empty (the account is unknown),
/// `Some(text)` makes `text` the account's token file (a corrupted one).
fn store(name: &str, token_file: Option<&str>) -> PathBuf {
    let dir = servers()
        .dir
        .join(format!("oauth2-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(text) = token_file {
        std::fs::write(dir.join("work.json"), text).unwrap();
    }
    dir
}

/// The two stores whose account cannot give a token, whatever the server.
fn unusable_stores(name: &str) -> [PathBuf; 2] {
    [
        store(&format!("{name}-empty"), None),
        store(&format!("{name}-corrupted"), Some("{\"user\": \"alice@exa")),
    ]
}

/// Runs the proxy with `input` on stdin; returns (stdout, stderr).
fn run(args: &[String], input: &str) -> (String, String) {
    let out = common::run_proxy(args, &[], input.as_bytes());
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The log lines that name the account: there must be exactly one, telling the admin the
/// command to run.
fn advice_lines(log: &str, store: &Path) -> Vec<String> {
    let lines: Vec<String> = log
        .lines()
        .filter(|line| line.contains("oauth2 account work"))
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 1, "one line for the admin:\n{log}");
    let command = format!(
        "legacy-mail-proxy oauth2 status --oauth2-dir {} work",
        store.display()
    );
    assert!(lines[0].contains(&command), "{}", lines[0]);
    lines
}

#[test]
fn pop3_with_an_unknown_or_corrupted_oauth2_account_answers_sys_temp_and_logs_the_command() {
    for store in unusable_stores("pop3") {
        pop3_sys_temp(&store);
    }
}

fn pop3_sys_temp(store: &Path) {
    let s = servers();
    let client_password = store.join("client-password");
    std::fs::write(&client_password, "s3cret-client\n").unwrap();
    let mut args = strings(&[
        "--log",
        "stderr",
        "--log-level",
        "debug",
        "pop3",
        "--imap-host",
        s.tls_host,
        "--auth-failure-delay",
        "0",
        "--imap-oauth2-account",
        "work",
        "--client-user",
        "alice",
    ]);
    args.extend([
        "--imap-port".into(),
        s.imaps_port.to_string(),
        "--ca-file".into(),
        s.ca_file.display().to_string(),
        "--oauth2-dir".into(),
        store.display().to_string(),
        "--client-password-file".into(),
        client_password.display().to_string(),
        "--lock-dir".into(),
        store.join("locks").display().to_string(),
    ]);
    let (out, log) = run(&args, "USER alice\r\nPASS s3cret-client\r\nQUIT\r\n");
    let replies: Vec<&str> = out.lines().collect();
    assert_eq!(
        replies[2], "-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later",
        "{out}"
    );
    assert!(!out.contains("[AUTH]"), "{out}");
    advice_lines(&log, store);
    assert!(!log.contains("s3cret-client"), "{log}");

    // The client's own password is still checked first: a wrong one is [AUTH].
    let (out, _) = run(&args, "USER alice\r\nPASS wrong\r\nQUIT\r\n");
    assert!(out.contains("-ERR [AUTH]"), "{out}");
}

#[test]
fn smtp_with_an_unknown_or_corrupted_oauth2_account_answers_454_never_535() {
    for store in unusable_stores("smtp") {
        smtp_454(&store);
    }
}

fn smtp_454(store: &Path) {
    let s = servers();
    let p = postfix();
    let mut args = strings(&[
        "--log",
        "stderr",
        "smtp",
        "--smtp-host",
        s.tls_host,
        "--client-auth",
        "none",
        "--smtp-oauth2-account",
        "work",
        "--hostname",
        "gw.test",
    ]);
    args.extend([
        "--smtp-port".into(),
        p.submissions_port.to_string(),
        "--ca-file".into(),
        s.ca_file.display().to_string(),
        "--oauth2-dir".into(),
        store.display().to_string(),
    ]);
    let (out, log) = run(
        &args,
        "EHLO client.test\r\nMAIL FROM:<a@example.test>\r\nQUIT\r\n",
    );
    assert!(
        out.contains("\r\n454 4.7.0 Temporary authentication failure; try again later\r\n"),
        "{out}"
    );
    assert!(!out.contains("535"), "{out}");
    advice_lines(&log, store);
}
