//! `legacy-mail-proxy smtp --accounts smtpproxy.ini` with the real binary against the real
//! Postfix and Dovecot: each sender through its own account's SASL login, a bad or
//! readable-by-others file refused before anything goes upstream, `--check`, and
//! POP-before-SMTP against Dovecot's POP3 from separate processes.

mod common;

use common::{User, postfix, proxy_bin, servers, wait_for_messages, wait_until};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A private directory for one test's accounts file and state, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lmp-accounts-test-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs one proxy process (logs to stderr at debug level) with `input` on stdin.
fn proxy(args: &[&str], input: &str) -> Output {
    let all: Vec<String> = [
        "--log",
        "stderr",
        "--log-level",
        "debug",
        "smtp",
        "--hostname",
        "proxy.test",
        "--connect-timeout",
        "5",
        "--backend-timeout",
        "30",
    ]
    .iter()
    .chain(args)
    .map(|a| a.to_string())
    .collect();
    common::run_proxy(&all, &[], input.as_bytes())
}

/// A proxy with the accounts file and POP-before-SMTP state of `dir`, open to any client.
fn pop_proxy(file: &Path, dir: &Dir, input: &str) -> Output {
    let state = dir.0.join("state");
    proxy(
        &[
            "--accounts",
            file.to_str().unwrap(),
            "--client-auth",
            "none",
            "--pop-before-smtp-dir",
            state.to_str().unwrap(),
        ],
        input,
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An account section for `user` on the test Postfix's implicit-TLS submission port.
fn smtp_section(sender: &str, user: &User, extra: &str) -> String {
    let s = servers();
    format!(
        "[{sender}]\nlocalhostname=device.test\nsmtphost={}\nsmtpport={}\nsmtpsecurity=ssl\n\
         smtpusername={}\nsmtppassword={}\ncafile={}\n{extra}\n",
        s.tls_host,
        postfix().submissions_port,
        user.name,
        user.password,
        s.ca_file.display()
    )
}

/// smtpproxy's `[config]` and `[logging]` sections as its README documents them.
const SMTPPROXY_DAEMON_SECTIONS: &str = "[config]\nport=25\nsleeptime=30\ndebuglevel=0\n\
     waitafterpop=0\ndeleteonerror=true\n\n[logging]\nfile=smtpproxy.log\nsize=1000000\n\
     count=10\nlevel=INFO\n\n";

fn message(from: &str, to: &str, subject: &str) -> String {
    format!(
        "MAIL FROM:<{from}>\r\nRCPT TO:<{to}>\r\nDATA\r\nFrom: <{from}>\r\nTo: <{to}>\r\n\
         Subject: {subject}\r\n\r\nbody of {subject}\r\n.\r\n"
    )
}

#[test]
fn three_senders_reach_their_mailboxes_through_their_own_accounts() {
    let s = servers();
    let (one, two) = (s.new_user("acct-one"), s.new_user("acct-two"));
    let rcpt = s.new_user("acct-rcpt");
    let dir = Dir::new("three");
    let ini = format!(
        "# as smtpproxy documents it\n{SMTPPROXY_DAEMON_SECTIONS}{}{}[scanner@devices.test]\nuse=printer@devices.test\n",
        smtp_section(
            "printer@devices.test",
            &one,
            &format!("returnpath={}\nreplyto=it@devices.test", one.email)
        ),
        smtp_section(
            "pbx@Devices.Test",
            &two,
            &format!("returnpath={}", two.email)
        ),
    );
    let file = dir.write("smtpproxy.ini", &ini, 0o600);
    let input = format!(
        "EHLO dev\r\n{}{}{}QUIT\r\n",
        message("printer@devices.test", &rcpt.email, "from the printer"),
        message("pbx@devices.test", &rcpt.email, "from the pbx"),
        message("scanner@DEVICES.TEST", &rcpt.email, "from the scanner"),
    );
    let out = proxy(
        &[
            "--accounts",
            file.to_str().unwrap(),
            "--client-auth",
            "none",
        ],
        &input,
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    // Postfix answers BDAT with `250 2.0.0 Ok: N bytes queued as ID`.
    assert_eq!(
        stdout.matches(" bytes queued as ").count(),
        3,
        "{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains(&one.password) && !stderr.contains(&two.password),
        "{stderr}"
    );
    for (sender, account) in [
        ("printer@devices.test", "printer@devices.test"),
        ("pbx@devices.test", "pbx@Devices.Test"),
        ("scanner@DEVICES.TEST", "printer@devices.test"),
    ] {
        let line = format!("from=<{sender}> account=[{account}] rcpts=1");
        assert!(stderr.contains(&line), "{line}\n{stderr}");
    }
    // smtpproxy's daemon settings: read, and named once in the log as ignored.
    assert!(
        stderr.contains(
            "smtpproxy settings read and ignored (--check says why): [config] port, \
             [config] sleeptime, [config] deleteonerror, [logging] file, [logging] size, \
             [logging] count, [logging] level\n"
        ),
        "{stderr}"
    );

    wait_for_messages(&rcpt, 3);
    let stored: Vec<String> = common::imap_fetch_all(&rcpt)
        .into_iter()
        .map(|(_, m)| text(&m))
        .collect();
    for (subject, return_path, reply_to) in [
        ("from the printer", &one.email, true),
        ("from the pbx", &two.email, false),
        ("from the scanner", &one.email, true),
    ] {
        let m = stored
            .iter()
            .find(|m| m.contains(&format!("Subject: {subject}\r\n")))
            .unwrap_or_else(|| panic!("{subject}: {stored:?}"));
        assert!(
            m.starts_with(&format!("Return-Path: <{return_path}>\r\n")),
            "{m}"
        );
        assert_eq!(m.contains("Reply-To: it@devices.test\r\n"), reply_to, "{m}");
    }

    // The backend's own account of the SASL logins: two messages as one, one as two.
    let mut seen = Vec::new();
    wait_until(
        "Postfix logs the three submissions",
        Duration::from_secs(30),
        || {
            seen = postfix()
                .submissions()
                .into_iter()
                .filter(|(user, _)| *user == one.name || *user == two.name)
                .collect();
            seen.len() == 3
        },
    );
    seen.sort();
    let mut expected = vec![
        (one.name.clone(), one.email.clone()),
        (one.name.clone(), one.email.clone()),
        (two.name.clone(), two.email.clone()),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    let log = std::fs::read_to_string(&postfix().log_file).unwrap();
    for user in [&one, &two] {
        let line = log
            .lines()
            .find(|l| l.ends_with(&format!(" sasl_username={}", user.name)))
            .unwrap();
        eprintln!("postfix: {line}");
    }
}

/// Each bad file: the client gets `421 4.3.0` at once and the log names file, line, key;
/// the upstream (a listener that counts connections) is never contacted.
#[test]
fn a_bad_accounts_file_is_a_421_and_nothing_goes_upstream() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    upstream.set_nonblocking(true).unwrap();
    let port = upstream.local_addr().unwrap().port();
    let dir = Dir::new("bad");
    let good = format!("[a@x.test]\nsmtphost=127.0.0.1\nsmtpport={port}\n");
    for (name, body, line_key) in [
        (
            "unknown-key",
            format!("{good}smtpserver=h\n"),
            ":4: smtpserver: unknown key",
        ),
        (
            "dangling-use",
            format!("{good}[b@x.test]\nuse=c@x.test\n"),
            ":5: use: [b@x.test] uses [c@x.test]",
        ),
        (
            "use-loop",
            format!("{good}[b@x.test]\nuse=c@x.test\n[c@x.test]\nuse=b@x.test\n"),
            ":5: use: use= goes round in a loop",
        ),
        (
            "no-smtphost",
            "[a@x.test]\nsmtpport=25\n".to_string(),
            ":1: smtphost: [a@x.test] has no smtphost",
        ),
        (
            "bad-port",
            "[a@x.test]\nsmtphost=127.0.0.1\nsmtpport=70000\n".to_string(),
            ":3: smtpport: \"70000\" is not a port",
        ),
    ] {
        let file = dir.write(&format!("{name}.ini"), &body, 0o600);
        let out = proxy(
            &[
                "--accounts",
                file.to_str().unwrap(),
                "--client-auth",
                "none",
            ],
            "EHLO dev\r\nMAIL FROM:<a@x.test>\r\nQUIT\r\n",
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(
            stdout, "421 4.3.0 Service not available: error in the accounts file\r\n",
            "{name}: {stderr}"
        );
        let expected = format!("accounts file {}{line_key}", file.display());
        assert!(stderr.contains(&expected), "{name}: {expected}\n{stderr}");
        assert!(!out.status.success());
    }
    assert!(upstream.accept().is_err(), "something connected upstream");
}

#[test]
fn a_file_others_may_read_is_refused_unless_the_admin_allows_it() {
    let dir = Dir::new("perm");
    let file = dir.write(
        "smtpproxy.ini",
        "[a@x.test]\nsmtphost=127.0.0.1\nsmtppassword=p\nsmtpusername=u\n",
        0o644,
    );
    let path = file.to_str().unwrap();
    let out = proxy(&["--accounts", path, "--client-auth", "none"], "QUIT\r\n");
    assert!(
        text(&out.stdout).starts_with("421 4.3.0 "),
        "{}",
        text(&out.stdout)
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("group or others may read or write it (mode 644)")
            && stderr.contains("chmod 600"),
        "{stderr}"
    );
    let out = proxy(
        &[
            "--accounts",
            path,
            "--client-auth",
            "none",
            "--accounts-insecure-permissions",
        ],
        "QUIT\r\n",
    );
    assert!(
        text(&out.stdout).starts_with("220 proxy.test ESMTP"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_prints_the_resolved_accounts_without_passwords() {
    let dir = Dir::new("check");
    dir.write("pbx.pw", "file-secret\n", 0o600);
    let file = dir.write(
        "smtpproxy.ini",
        &format!(
            "{SMTPPROXY_DAEMON_SECTIONS}[a@x.test]\nsmtphost=smtp.x.test\nsmtpsecurity=tls\n\
             smtpusername=a\nsmtppassword=inline-secret\n[pbx@x.test]\nsmtphost=smtp.y.test\n\
             smtpusername=p\nsmtppassword_file=pbx.pw\n[b@x.test]\nuse=a@x.test\n"
        ),
        0o600,
    );
    let out = Command::new(proxy_bin())
        .args(["smtp", "--accounts", file.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for expected in [
        "2 account(s), 1 alias(es)",
        "smtp: smtp.x.test:25 (STARTTLS)",
        "login: a, password in the accounts file",
        "smtp: smtp.y.test:25 (NO ENCRYPTION)",
        "password from ",
        "[b@x.test] (line 23) sends through [a@x.test]",
        "[config] port:",
        "[logging] file:",
    ] {
        assert!(stdout.contains(expected), "{expected}:\n{stdout}");
    }
    assert!(!stdout.contains("secret"), "{stdout}");
    std::fs::write(&file, "[a@x.test]\nsmtpport=1\n").unwrap();
    let out = Command::new(proxy_bin())
        .args(["smtp", "--accounts", file.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(":1: smtphost:"),
        "{}",
        text(&out.stderr)
    );
}

/// Dovecot's log lines of successful POP3 logins for `user`.
fn pop_logins(user: &User) -> Vec<String> {
    servers()
        .dovecot_logs()
        .lines()
        .filter(|l| l.contains(&format!("pop3-login: Info: Login: user=<{}>", user.name)))
        .map(str::to_string)
        .collect()
}

/// An account with POP-before-SMTP against the test Dovecot: smtpproxy's way (POP3S,
/// `popssl=true`) or, with `stls`, our `popsecurity=tls` on the plain POP3 port.
fn pop_section(
    sender: &str,
    smtp: &User,
    pop: &User,
    password: &str,
    delay: u64,
    stls: bool,
) -> String {
    let s = servers();
    let security = match stls {
        true => format!("popport={}\npopsecurity=tls", s.pop3_port),
        false => format!("popport={}\npopssl=true", s.pop3s_port),
    };
    smtp_section(
        sender,
        smtp,
        &format!(
            "popbeforesmtp=true\npophost={}\n{security}\npopusername={}\n\
             poppassword={password}\npopcheckdelay={delay}\n",
            s.tls_host, pop.name
        ),
    )
}

#[test]
fn pop_before_smtp_logs_in_once_per_popcheckdelay_across_processes() {
    let s = servers();
    let (smtp, pop, rcpt) = (
        s.new_user("pbs-smtp"),
        s.new_user("pbs-pop"),
        s.new_user("pbs-rcpt"),
    );
    let dir = Dir::new("pop");
    let ini = format!(
        "[config]\nwaitafterpop=1\n\n{}",
        pop_section("dev@pbs.test", &smtp, &pop, &pop.password, 3600, false)
    );
    let file = dir.write("smtpproxy.ini", &ini, 0o600);
    for n in 1..=2 {
        let started = std::time::Instant::now();
        let out = pop_proxy(
            &file,
            &dir,
            &format!(
                "HELO dev\r\n{}QUIT\r\n",
                message("dev@pbs.test", &rcpt.email, &format!("pbs {n}"))
            ),
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(stdout.contains("250 2.0.0 Ok: "), "{stdout}\n{stderr}");
        let logged_in = stderr.contains("POP-before-SMTP login as");
        assert_eq!(logged_in, n == 1, "process {n}: {stderr}");
        if n == 1 {
            // waitafterpop=1
            assert!(started.elapsed() >= Duration::from_secs(1));
        }
        eprintln!(
            "POP-before-SMTP session {n} (debug build, waitafterpop=1): {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert!(!stderr.contains(&pop.password), "{stderr}");
    }
    wait_for_messages(&rcpt, 2);
    let logins = pop_logins(&pop);
    assert_eq!(logins.len(), 1, "{logins:?}");
    assert!(logins[0].contains(", TLS"), "POP3S was used: {logins:?}");

    // popcheckdelay=0: every process logs in again (here with STLS).
    std::fs::write(
        &file,
        pop_section("dev@pbs.test", &smtp, &pop, &pop.password, 0, true),
    )
    .unwrap();
    let out = pop_proxy(
        &file,
        &dir,
        &format!(
            "HELO dev\r\n{}QUIT\r\n",
            message("dev@pbs.test", &rcpt.email, "pbs 3")
        ),
    );
    assert!(
        text(&out.stdout).contains("250 2.0.0 Ok: "),
        "{}",
        text(&out.stderr)
    );
    wait_until(
        "Dovecot logs the second POP login",
        Duration::from_secs(10),
        || pop_logins(&pop).len() == 2,
    );
    assert!(
        pop_logins(&pop)[1].contains(", TLS"),
        "STLS: {:?}",
        pop_logins(&pop)
    );
}

#[test]
fn a_failed_pop_login_is_451_and_the_message_stays_with_the_client() {
    let s = servers();
    let (smtp, pop, rcpt) = (
        s.new_user("pbsf-smtp"),
        s.new_user("pbsf-pop"),
        s.new_user("pbsf-rcpt"),
    );
    let dir = Dir::new("popfail");
    let file = dir.write(
        "smtpproxy.ini",
        &pop_section("dev@pbs.test", &smtp, &pop, "wrong-password", 60, false),
        0o600,
    );
    // One message from dev@pbs.test: refused with 451 4.7.0; the log says why (`because`).
    let refused = |file: &Path, because: &str| {
        let out = pop_proxy(
            file,
            &dir,
            &format!(
                "HELO dev\r\n{}QUIT\r\n",
                message("dev@pbs.test", &rcpt.email, "never")
            ),
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            stdout.contains("\r\n451 4.7.0 POP-before-SMTP login failed"),
            "{stdout}"
        );
        assert!(
            stderr.contains("account [dev@pbs.test]: POP-before-SMTP failed:")
                && stderr.contains(because),
            "{stderr}"
        );
        assert!(!stderr.contains("wrong-password"), "{stderr}");
    };
    refused(&file, "PASS answered \"-ERR");
    let stamps = dir.0.join("state").read_dir().unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".stamp")
    });
    assert_eq!(stamps.count(), 0, "a failed login leaves no time stamp");
    // A POP3S certificate from a CA the account does not trust: refused like every
    // backend's, before any password is sent.
    let untrusted = dir.write(
        "untrusted.ini",
        &pop_section("dev@pbs.test", &smtp, &pop, &pop.password, 60, false).replace(
            &format!("cafile={}", s.ca_file.display()),
            &format!("cafile={}", s.untrusted_ca_file.display()),
        ),
        0o600,
    );
    refused(&untrusted, "TLS handshake with localhost failed");
    assert!(pop_logins(&pop).is_empty());
    // Nothing reached Postfix for that account.
    assert!(
        !std::fs::read_to_string(&postfix().log_file)
            .unwrap()
            .contains(&format!("sasl_username={}", smtp.name))
    );
}

/// `--client-auth local`: a device logs in with its section's name (smtpproxy's way) and
/// the section's clientpassword_file; it may send only as that account.
#[test]
fn a_client_logs_in_as_its_section_and_sends_only_as_that_account() {
    let s = servers();
    let (one, two, rcpt) = (
        s.new_user("auth-one"),
        s.new_user("auth-two"),
        s.new_user("auth-rcpt"),
    );
    let dir = Dir::new("auth");
    dir.write("printer.pw", "printer-secret\n", 0o600);
    let ini = format!(
        "{}{}",
        smtp_section(
            "printer@devices.test",
            &one,
            &format!("clientpassword_file=printer.pw\nreturnpath={}", one.email)
        ),
        smtp_section("pbx@devices.test", &two, "clientpassword=pbx-secret"),
    );
    let file = dir.write("smtpproxy.ini", &ini, 0o600);
    let plain = |user: &str, password: &str| {
        legacy_mail_proxy::base64::encode(format!("\0{user}\0{password}").as_bytes())
    };
    let args = [
        "--accounts",
        file.to_str().unwrap(),
        "--client-auth",
        "local",
        "--auth-failure-delay",
        "0",
    ];
    let out = proxy(
        &args,
        &format!(
            "EHLO dev\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}\r\nMAIL FROM:<pbx@devices.test>\r\n{}QUIT\r\n",
            plain("printer@devices.test", "pbx-secret"),
            plain("printer@devices.test", "printer-secret"),
            message("printer@devices.test", &rcpt.email, "logged in"),
        ),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let codes: Vec<&str> = stdout.lines().map(|l| &l[..3]).collect();
    assert_eq!(
        codes,
        [
            "220", "250", "250", "250", "250", "250", "250", "535", "235", "550", "250", "250",
            "354", "250", "221"
        ],
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("550 5.7.1 Sender address <pbx@devices.test> not allowed for this login"),
        "{stdout}"
    );
    assert!(
        !stderr.contains("printer-secret") && !stderr.contains("pbx-secret"),
        "{stderr}"
    );
    wait_for_messages(&rcpt, 1);
    wait_until(
        "Postfix logs the submission",
        Duration::from_secs(30),
        || {
            postfix()
                .submissions()
                .iter()
                .any(|(user, from)| *user == one.name && *from == one.email)
        },
    );
    assert!(
        !postfix()
            .submissions()
            .iter()
            .any(|(user, _)| *user == two.name)
    );
}
