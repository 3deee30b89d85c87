//! `pop3 --auth oauth2` and `smtp --smtp-oauth2-account` through the real binary, against
//! the real Dovecot and Postfix of the harness: what the client hears and what the admin
//! reads when the OAuth2 account cannot give a token.
//!
//! Then, with tokens a real authorization server issued (`oidc-provider`, see
//! tests/common/oauth2.rs) and the Dovecot and Postfix that accept them: an account
//! authorized with `legacy-mail-proxy oauth2 authorize` (device flow, approved by the
//! scripted browser), a POP3 download with curl and an SMTP send with smtplib, the access
//! token (8 s) expiring between sessions and during one, 20 sessions at the moment of
//! expiry sharing one refresh, a revoked refresh token, the provider down, and no token
//! in any log.

mod common;

use common::{User, oauth2, postfix, servers};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

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
    let client_password = store.join("client-password");
    std::fs::write(&client_password, "s3cret-client\n").unwrap();
    let client_password = client_password.display().to_string();
    let clients = [
        "--client-user",
        "alice",
        "--client-password-file",
        &client_password,
        "--auth-failure-delay",
        "0",
    ];
    let args = pop3_args(servers().imaps_port, store, &clients);
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
    let args = smtp_args(postfix().submissions_port, store);
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

// ---- end to end with the real authorization server (o2srv's harness) -------------------

/// An account authorized the way an admin does it: `legacy-mail-proxy oauth2 authorize`
/// with the device flow against the test authorization server, approved in the scripted
/// browser as `user`. Returns the store directory.
fn authorize(name: &str, user: &User, margin: u64) -> PathBuf {
    let w = oauth2();
    let dir = store(name, None);
    let mut child = Command::new(common::proxy_bin())
        .args([
            "oauth2",
            "authorize",
            "work",
            "--provider",
            "custom",
            "--flow",
            "device",
        ])
        .args([
            "--user",
            &user.name,
            "--client-id",
            common::PUBLIC_CLIENT_ID,
        ])
        .args(["--token-url", &w.idp.token_endpoint])
        .args(["--device-url", &w.idp.device_authorization_endpoint])
        .args(["--scope", common::SCOPES])
        .args(["--refresh-margin", &margin.to_string()])
        .arg("--ca-file")
        .arg(&w.idp.ca_file)
        .arg("--oauth2-dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oauth2 authorize");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let code = loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "authorize printed no code:\n{printed}"
        );
        printed.push_str(&line);
        if let Some(code) = user_code(&line) {
            break code;
        }
    };
    w.idp.approve_device(&code, user);
    let out = child.wait_with_output().unwrap();
    common::keep_proxy_log(&out.stderr);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The user code in authorize's line `… open URL in any browser and enter the code CODE`.
fn user_code(line: &str) -> Option<String> {
    let (_, code) = line.split_once("enter the code ")?;
    Some(code.trim().to_string())
}

/// pop3 options for the account in `dir` and an IMAP server on `port` (the password
/// Dovecot's or the OAuth2 one's), with `clients` saying how clients are checked.
fn pop3_args(port: u16, dir: &Path, clients: &[&str]) -> Vec<String> {
    let s = servers();
    let mut args = strings(&[
        "--log",
        "stderr",
        "--log-level",
        "debug",
        "pop3",
        "--imap-host",
        s.tls_host,
        "--imap-oauth2-account",
        "work",
        "--no-lock",
        "--delete-policy",
        "keep",
    ]);
    args.extend(strings(clients));
    args.extend(backend_args("--imap-port", port, dir));
    args
}

/// The backend's port, the harness CA and the token store.
fn backend_args(port_option: &str, port: u16, dir: &Path) -> Vec<String> {
    vec![
        port_option.into(),
        port.to_string(),
        "--ca-file".into(),
        servers().ca_file.display().to_string(),
        "--oauth2-dir".into(),
        dir.display().to_string(),
    ]
}

/// pop3 options for the OAuth2 Dovecot, any client accepted.
fn oauth2_pop3_args(dir: &Path) -> Vec<String> {
    pop3_args(oauth2().imaps_port, dir, &["--ignore-client-credentials"])
}

/// smtp options for the account in `dir` and a submission server on `port`.
fn smtp_args(port: u16, dir: &Path) -> Vec<String> {
    let s = servers();
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
    args.extend(backend_args("--smtp-port", port, dir));
    args
}

/// smtp options for the OAuth2 Postfix.
fn oauth2_smtp_args(dir: &Path) -> Vec<String> {
    smtp_args(oauth2().postfix.submissions_port, dir)
}

/// The stored account's access token expiry (unix seconds) and tokens, from its file.
fn stored(dir: &Path) -> (u64, String, String) {
    let text = std::fs::read_to_string(dir.join("work.json")).unwrap();
    let account: serde_json::Value = serde_json::from_str(&text).unwrap();
    let text = |key: &str| account[key].as_str().unwrap_or_default().to_string();
    (
        account["expires_at"].as_u64().expect("expires_at"),
        text("access_token"),
        text("refresh_token"),
    )
}

/// Waits (polling the clock, no server involved) until the stored access token expired.
fn until_expired(dir: &Path) {
    let (expires_at, ..) = stored(dir);
    common::wait_until(
        "the stored access token to expire",
        Duration::from_secs(oauth2().idp.access_ttl + 30),
        || common::unix_now() > expires_at,
    );
}

fn pop3_retr_all(args: &[String]) -> (String, String) {
    run(args, "USER any\r\nPASS any\r\nSTAT\r\nRETR 1\r\nQUIT\r\n")
}

fn smtp_send(args: &[String], to: &str, subject: &str) -> (String, String) {
    run(
        args,
        &format!(
            "EHLO c.test\r\nMAIL FROM:<{to}>\r\nRCPT TO:<{to}>\r\nDATA\r\nSubject: {subject}\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        ),
    )
}

/// A user with one message, and an account authorized for it.
fn authorized_user(name: &str, margin: u64) -> (User, PathBuf) {
    let user = servers().new_user(name);
    user.seed_many(&[format!("Subject: {name}\r\n\r\nhello {name}\r\n").into_bytes()]);
    let dir = authorize(name, &user, margin);
    (user, dir)
}

fn assert_retrieved(out: &str, log: &str, name: &str) {
    assert!(out.contains(&format!("hello {name}\r\n")), "{out}\n{log}");
    assert!(!out.contains("-ERR"), "{out}\n{log}");
}

/// No access or refresh token of `dir` in `text`.
fn assert_no_tokens(text: &str, dir: &Path) {
    let (_, access, refresh) = stored(dir);
    for secret in [access, refresh] {
        assert!(
            secret.is_empty() || !text.contains(&secret),
            "a token in the log"
        );
    }
}

#[test]
fn pop3_download_and_smtp_send_with_a_token_through_real_clients() {
    let w = oauth2();
    let _up = w.idp.shared();
    let (user, dir) = authorized_user("e2e-basic", 2);
    // curl, a real POP3 client, through an inetd socket.
    let inetd = common::Inetd::start(common::proxy_bin(), &oauth2_pop3_args(&dir), &[]);
    let out = Command::new(common::require_client("curl"))
        .args(["-s", "--user", "any:any"])
        .arg(format!("pop3://127.0.0.1:{}/1", inetd.port))
        .output()
        .unwrap();
    let mail = String::from_utf8_lossy(&out.stdout);
    assert!(mail.contains("hello e2e-basic"), "{mail}\n{}", inetd.logs());
    // smtplib, a real SMTP client.
    let inetd = common::Inetd::start(common::proxy_bin(), &oauth2_smtp_args(&dir), &[]);
    common::python_ok(
        "import os,smtplib\n\
         s=smtplib.SMTP('127.0.0.1',int(os.environ['PORT']))\n\
         s.sendmail(os.environ['TO'],[os.environ['TO']],'Subject: sent with a token\\r\\n\\r\\nhi\\r\\n')\n\
         s.quit()",
        &[
            ("PORT", &inetd.port.to_string()),
            ("TO", &format!("{}@{}", user.name, w.postfix.domain)),
        ],
    );
    common::wait_for_messages(&user, 2);
    assert_no_tokens(&inetd.logs(), &dir);
}

/// `oauth2account=` in an smtpproxy.ini section (`smtp --accounts`, issue 12) logs in with
/// the same token store as --smtp-oauth2-account.
#[test]
fn an_accounts_file_section_sends_with_its_oauth2_account() {
    let w = oauth2();
    let _up = w.idp.shared();
    let (user, dir) = authorized_user("e2e-accounts", 2);
    let address = format!("{}@{}", user.name, w.postfix.domain);
    let accounts = dir.join("smtpproxy.ini");
    std::fs::write(
        &accounts,
        format!(
            "[scanner@devices.test]\nsmtphost={}\nsmtpport={}\nsmtpsecurity=ssl\n\
             cafile={}\noauth2account=work\nreturnpath={address}\n",
            servers().tls_host,
            w.postfix.submissions_port,
            servers().ca_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &accounts,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut args = strings(&["--log", "stderr", "smtp", "--client-auth", "none"]);
    args.extend(strings(&["--hostname", "gw.test", "--accounts"]));
    args.push(accounts.display().to_string());
    args.push("--oauth2-dir".into());
    args.push(dir.display().to_string());
    let (out, log) = run(
        &args,
        &format!(
            "EHLO c.test\r\nMAIL FROM:<scanner@devices.test>\r\nRCPT TO:<{address}>\r\n\
             DATA\r\nSubject: through an account\r\n\r\nhi\r\n.\r\nQUIT\r\n"
        ),
    );
    assert!(out.contains("\r\n250 2.0.0 Ok: "), "{out}\n{log}");
    assert!(log.contains("account=[scanner@devices.test]"), "{log}");
    common::wait_for_messages(&user, 2);
    let postfix_log = std::fs::read_to_string(&w.postfix.log_file).unwrap();
    assert!(
        postfix_log.lines().any(|l| l.contains("sasl_method=")
            && !l.contains("sasl_method=PLAIN")
            && l.ends_with(&format!(" sasl_username={}", user.name))),
        "an OAuth2 SASL login as {}:\n{postfix_log}",
        user.name
    );
    assert_no_tokens(&log, &dir);
}

#[test]
fn the_token_expiring_between_sessions_is_refreshed_once() {
    let w = oauth2();
    let _up = w.idp.shared();
    let (_user, dir) = authorized_user("e2e-between", 2);
    let (out, log) = pop3_retr_all(&oauth2_pop3_args(&dir));
    assert_retrieved(&out, &log, "e2e-between");
    let (_, first, _) = stored(&dir);
    until_expired(&dir);
    let (out, log) = pop3_retr_all(&oauth2_pop3_args(&dir));
    assert_retrieved(&out, &log, "e2e-between");
    let (_, second, _) = stored(&dir);
    assert_ne!(first, second, "a new access token was stored");
    assert_no_tokens(&log, &dir);
}

#[test]
fn the_token_expiring_during_a_long_session_does_not_end_it() {
    let w = oauth2();
    let _up = w.idp.shared();
    let (_user, dir) = authorized_user("e2e-during", 2);
    let mut child = Command::new(common::proxy_bin())
        .args(oauth2_pop3_args(&dir))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for command in ["", "USER any\r\n", "PASS any\r\n"] {
        stdin.write_all(command.as_bytes()).unwrap();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("+OK"), "{command}: {line}");
    }
    until_expired(&dir);
    stdin.write_all(b"RETR 1\r\nQUIT\r\n").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    common::keep_proxy_log(&out.stderr);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_retrieved(&rest, &log, "e2e-during");
}

#[test]
fn twenty_sessions_at_the_moment_of_expiry_share_one_refresh() {
    let w = oauth2();
    // Alone with the authorization server, so that its grant log counts only this test's
    // refreshes (it names no account).
    // A margin of 0: every session finds the token expired at once.
    let (user, dir) = authorized_user("e2e-twenty", 0);
    let _alone = w.idp.exclusive();
    let (_, _, refresh_before) = stored(&dir);
    until_expired(&dir);
    let refreshes_before = w.idp.token_calls("refresh_token");
    let pop3 = oauth2_pop3_args(&dir);
    let smtp = oauth2_smtp_args(&dir);
    let to = format!("{}@{}", user.name, w.postfix.domain);
    let sessions: Vec<_> = (0..20)
        .map(|i| {
            let (pop3, smtp, to) = (pop3.clone(), smtp.clone(), to.clone());
            std::thread::spawn(move || match i % 2 {
                0 => pop3_retr_all(&pop3),
                _ => smtp_send(&smtp, &to, &format!("twenty {i}")),
            })
        })
        .collect();
    for (i, session) in sessions.into_iter().enumerate() {
        let (out, log) = session.join().unwrap();
        match i % 2 {
            0 => assert_retrieved(&out, &log, "e2e-twenty"),
            _ => assert!(out.contains("\r\n250 2.0.0"), "{out}\n{log}"),
        }
    }
    let (_, _, refresh_after) = stored(&dir);
    assert_ne!(refresh_before, refresh_after, "the refresh token rotated");
    let refreshes = w.idp.token_calls("refresh_token") - refreshes_before;
    assert_eq!(refreshes, 1, "grant log:\n{}", w.idp.grant_log_text());
    // The seeded message and the ten sent.
    common::wait_for_messages(&user, 11);
}

#[test]
fn a_revoked_refresh_token_gives_a_clear_error_and_no_auth() {
    let w = oauth2();
    let _up = w.idp.shared();
    let (_user, dir) = authorized_user("e2e-revoked", 2);
    let (_, _, refresh) = stored(&dir);
    // Revoking the refresh token ends its access tokens too: the stored one, still
    // unexpired, is rejected at once, and the renewal gets invalid_grant.
    assert_eq!(w.idp.revoke(common::PUBLIC_CLIENT_ID, &refresh), 200);
    let (out, log) = pop3_retr_all(&oauth2_pop3_args(&dir));
    assert!(out.contains("-ERR [SYS/TEMP]"), "{out}");
    assert!(!out.contains("[AUTH]"), "{out}");
    assert!(log.contains("legacy-mail-proxy oauth2 authorize"), "{log}");
    let (out, log) = smtp_send(&oauth2_smtp_args(&dir), "x@example.test", "revoked");
    assert!(out.contains("454 4.7.0"), "{out}");
    assert!(!out.contains("535"), "{out}");
    assert_no_tokens(&log, &dir);
}

#[test]
fn the_authorization_server_down_gives_temporary_errors_and_the_stored_token_is_tried() {
    let w = oauth2();
    let _alone = w.idp.exclusive();
    // A margin of 0: the token stays the one to use for its whole 8 s.
    let (_user, dir) = authorized_user("e2e-down", 0);
    w.idp.stop();
    // The stored token is still valid, so it is sent without asking the provider; but the
    // test Dovecot checks tokens by introspection at that same server, so it answers
    // [UNAVAILABLE] (Postfix, through it, 454): a temporary failure, not retried.
    let (out, log) = pop3_retr_all(&oauth2_pop3_args(&dir));
    let (smtp_out, smtp_log) = smtp_send(&oauth2_smtp_args(&dir), "x@example.test", "down");
    w.idp.start();
    assert!(out.contains("-ERR [SYS/TEMP]"), "{out}\n{log}");
    assert!(!out.contains("[AUTH]"), "{out}");
    assert!(
        log.contains("AUTHENTICATE OAUTHBEARER: [UNAVAILABLE]") && !log.contains("renewing"),
        "the stored token was sent, without a refresh:\n{log}"
    );
    assert!(smtp_out.contains("454 4.7.0"), "{smtp_out}\n{smtp_log}");
    assert!(!smtp_out.contains("535"), "{smtp_out}");
    // Back up: the same account works again.
    let (out, log) = pop3_retr_all(&oauth2_pop3_args(&dir));
    assert_retrieved(&out, &log, "e2e-down");
}

/// A server that offers XOAUTH2 but not OAUTHBEARER (as Gmail's and Microsoft's did for
/// years): the OAuth2 Dovecot with `AUTH=OAUTHBEARER` taken out of its capabilities, over
/// plain IMAP on 127.0.0.1 so that the lines can be edited. The gateway must log in with
/// XOAUTH2, and Dovecot must say so.
#[test]
fn pop3_logs_in_with_xoauth2_when_the_server_offers_only_that() {
    let w = oauth2();
    let _up = w.idp.shared();
    let (user, dir) = authorized_user("e2e-xoauth2", 2);
    let port = common::line_filter(w.imap_port, |line| {
        Some(common::without_capability(line, " AUTH=OAUTHBEARER"))
    });
    let mut args = pop3_args(port, &dir, &["--ignore-client-credentials"]);
    let host = args.iter().position(|a| a == "--imap-host").unwrap() + 1;
    args[host] = "127.0.0.1".into();
    args.extend(strings(&["--imap-tls", "none"]));
    let (out, log) = pop3_retr_all(&args);
    assert_retrieved(&out, &log, "e2e-xoauth2");
    let logins = w.dovecot_logs();
    let login = logins
        .lines()
        .find(|l| l.contains("Login: ") && l.contains(&format!("user=<{}>", user.name)))
        .unwrap_or_else(|| panic!("no login of {} in:\n{logins}", user.name));
    assert!(login.contains("method=XOAUTH2"), "{login}");
    assert_no_tokens(&log, &dir);
}
