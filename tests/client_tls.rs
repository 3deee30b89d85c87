//! TLS toward clients (issue 16) with real clients through an inetd-style listener: POP3
//! STLS and POP3S (poplib, curl, fetchmail), SMTP STARTTLS and SMTPS (swaks, smtplib),
//! the legacy TLS 1.0/1.1 floor (openssl s_client), STLS/STARTTLS command injection,
//! required TLS, bad certificate files and the handshake timeout. The proxy's certificate
//! is the test CA's `localhost` certificate; clients trust the test CA.

mod common;

use common::{Inetd, User, postfix, proxy_bin, python, python_ok, require_client, servers};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `--client-tls MODE` with the test certificate, and `extra` options.
fn client_tls(mode: &str, extra: &[&str]) -> Vec<String> {
    let t = &servers().tls;
    let mut args = strings(&["--client-tls", mode, "--client-tls-cert"]);
    args.push(t.server_cert.display().to_string());
    args.push("--client-tls-key".into());
    args.push(t.server_key.display().to_string());
    args.extend(strings(extra));
    args
}

/// `pop3` over implicit TLS to Dovecot, passthrough logins, then `tls`.
fn pop3_args(tls: &[String]) -> Vec<String> {
    let s = servers();
    let mut args = strings(&[
        "--log",
        "stderr",
        "--log-level",
        "debug",
        "pop3",
        "--imap-host",
        s.tls_host,
        "--imap-tls",
        "implicit",
        "--auth-failure-delay",
        "0",
    ]);
    args.extend([
        "--imap-port".into(),
        s.imaps_port.to_string(),
        "--ca-file".into(),
        s.ca_file.display().to_string(),
        "--lock-dir".into(),
        s.dir.join("pop3-locks").display().to_string(),
    ]);
    args.extend(tls.iter().cloned());
    args
}

/// `smtp` relaying through Postfix's submissions port as `account`, open to any client
/// (no client AUTH), then `tls`. Returns the arguments and the environment.
fn smtp_args(account: &User, tls: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let s = servers();
    let mut args = strings(&["--log", "stderr", "--log-level", "debug", "smtp"]);
    args.extend([
        "--smtp-host".into(),
        s.host.into(),
        "--smtp-port".into(),
        postfix().submissions_port.to_string(),
        "--smtp-tls".into(),
        "implicit".into(),
        "--ca-file".into(),
        s.ca_file.display().to_string(),
        "--smtp-user".into(),
        account.name.clone(),
        "--client-auth".into(),
        "none".into(),
        "--hostname".into(),
        "proxy.test".into(),
    ]);
    args.extend(tls.iter().cloned());
    (
        args,
        vec![("LMP_SMTP_PASSWORD".into(), account.password.clone())],
    )
}

fn ca() -> String {
    servers().ca_file.display().to_string()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const MESSAGE: &[u8] = b"From: a@example.test\r\nSubject: tls test\r\n\r\nHello over TLS\r\n";

fn seeded(prefix: &str) -> User {
    let user = servers().new_user(prefix);
    user.seed_many(&[MESSAGE, MESSAGE]);
    user
}

/// poplib's STLS / POP3_SSL: logs in and prints STAT's message count.
fn poplib_stat(port: u16, implicit: bool, user: &User) -> String {
    let connect = if implicit {
        "p=poplib.POP3_SSL('127.0.0.1',port,context=ctx)"
    } else {
        "p=poplib.POP3('127.0.0.1',port); print(p.capa().get('STLS') is not None); p.stls(context=ctx)"
    };
    let out = python_ok(
        &format!(
            "import os,poplib,ssl\nport=int(os.environ['PORT'])\n\
             ctx=ssl.create_default_context(cafile=os.environ['CA'])\n{connect}\n\
             print('STLS' in p.capa())\np.user(os.environ['U']); p.pass_(os.environ['P'])\n\
             print(p.stat()[0]); p.quit()"
        ),
        &[
            ("PORT", &port.to_string()),
            ("CA", &ca()),
            ("U", &user.name),
            ("P", &user.password),
        ],
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn curl_list(url: &str, user: &User, extra: &[&str]) -> Output {
    Command::new(require_client("curl"))
        .args(["-s", "-S", "--max-time", "30", "--cacert", &ca(), "--user"])
        .arg(format!("{}:{}", user.name, user.password))
        .args(extra)
        .arg(url)
        .output()
        .unwrap()
}

/// fetchmail with `tls_options` ("ssl" for POP3S, "sslproto TLS1.2+" for STLS), keeping
/// the mail; returns the mbox it wrote.
fn fetchmail(port: u16, user: &User, tls_options: &str) -> Vec<u8> {
    let dir = servers().dir.join(format!("fetchmail-tls-{}", user.name));
    std::fs::create_dir_all(&dir).unwrap();
    let rc = dir.join("fetchmailrc");
    let mbox = dir.join("mbox");
    std::fs::write(
        &rc,
        format!(
            "set no syslog\nset postmaster root\npoll 127.0.0.1 service {port} protocol pop3 auth password:\n  user \"{}\" password \"{}\" is root here keep {tls_options} sslcertck sslcertfile \"{}\" sslcommonname localhost mda \"/bin/sh -c 'cat >> {}'\"\n",
            user.name,
            user.password,
            ca(),
            mbox.display()
        ),
    )
    .unwrap();
    let out = common::run_fetchmail(&rc, &dir, &[]);
    assert_eq!(out.status.code(), Some(0), "fetchmail: {}", text(&out));
    std::fs::read(mbox).unwrap()
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[test]
fn pop3_stls_with_poplib_curl_and_fetchmail() {
    let user = seeded("stls");
    let inetd = Inetd::start(proxy_bin(), &pop3_args(&client_tls("starttls", &[])), &[]);
    // STLS announced before TLS, not after; the login works through TLS.
    assert_eq!(poplib_stat(inetd.port, false, &user), "True\nFalse\n2\n");
    let list = curl_list(
        &format!("pop3://127.0.0.1:{}/", inetd.port),
        &user,
        &["--ssl-reqd"],
    );
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).lines().count(),
        2,
        "{}",
        text(&list)
    );
    let mbox = fetchmail(inetd.port, &user, "sslproto 'TLS1.2+'");
    assert_eq!(count(&mbox, b"Hello over TLS"), 2);
    let logs = inetd.logs();
    assert_eq!(
        logs.matches("client TLS with 127.0.0.1:").count(),
        3,
        "{logs}"
    );
    assert!(!logs.contains(&user.password), "password in the log");
}

#[test]
fn pop3s_with_poplib_curl_and_fetchmail() {
    let user = seeded("pop3s");
    let inetd = Inetd::start(proxy_bin(), &pop3_args(&client_tls("implicit", &[])), &[]);
    assert_eq!(poplib_stat(inetd.port, true, &user), "False\n2\n");
    let list = curl_list(&format!("pop3s://127.0.0.1:{}/", inetd.port), &user, &[]);
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).lines().count(),
        2,
        "{}",
        text(&list)
    );
    let mbox = fetchmail(inetd.port, &user, "ssl");
    assert_eq!(count(&mbox, b"Hello over TLS"), 2);
    let logs = inetd.logs();
    assert_eq!(
        logs.matches("client TLS with 127.0.0.1:").count(),
        3,
        "{logs}"
    );
}

/// Python that reads the greeting (up to the line starting `greeting_lines_end`), says
/// `hello` if any (SMTP: until `250 `), sends `command_and_injected` in one packet, then
/// starts TLS; sends `after` through TLS and prints everything the server says.
fn injection(
    port: u16,
    greeting_lines_end: &str,
    hello: &str,
    command_and_injected: &str,
    after: &str,
) -> String {
    let out = python_ok(
        &format!(
            "import os,socket,ssl,sys\n\
             s=socket.create_connection(('127.0.0.1',int(os.environ['PORT'])))\n\
             def line():\n    b=b''\n    while not b.endswith(b'\\n'):\n        c=s.recv(1)\n        assert c, b\n        b+=c\n    return b\n\
             clear=b''\n\
             def until(end):\n    global clear\n    while True:\n        l=line(); clear+=l\n        if l.startswith(end): return\n\
             until({greeting_lines_end:?}.encode())\n\
             if {hello:?}:\n    s.sendall({hello:?}.encode()); until(b'250 ')\n\
             s.sendall({command_and_injected:?}.encode())\n\
             clear+=line()\n\
             t=ssl.create_default_context(cafile=os.environ['CA']).wrap_socket(s,server_hostname='localhost')\n\
             t.sendall({after:?}.encode())\n\
             tls=b''\n\
             while True:\n    c=t.recv(65536)\n    if not c: break\n    tls+=c\n\
             sys.stdout.buffer.write(clear+b'--TLS--\\n'+tls)"
        ),
        &[("PORT", &port.to_string()), ("CA", &ca())],
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn pop3_commands_pipelined_after_stls_in_one_packet_are_not_executed() {
    let inetd = Inetd::start(proxy_bin(), &pop3_args(&client_tls("starttls", &[])), &[]);
    let out = injection(
        inetd.port,
        "+OK",
        "",
        "STLS\r\nCAPA\r\nUSER evil\r\n",
        "QUIT\r\n",
    );
    // Only QUIT, sent through TLS, is answered after the handshake: the CAPA and USER that
    // rode along with STLS in clear text were dropped.
    assert_eq!(
        out,
        "+OK legacy-mail-proxy POP3 ready.\r\n+OK Begin TLS negotiation\r\n--TLS--\n+OK Bye.\r\n"
    );
    let logs = inetd.logs();
    assert!(logs.contains("end=quit"), "{logs}");
}

#[test]
fn smtp_commands_pipelined_after_starttls_in_one_packet_are_not_executed() {
    let (args, env) = smtp_args(
        &servers().new_user("inject-relay"),
        &client_tls("starttls", &[]),
    );
    let inetd = Inetd::start(proxy_bin(), &args, &env);
    let out = injection(
        inetd.port,
        "220 ",
        "EHLO c.example\r\n",
        "STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.test>\r\n",
        "QUIT\r\n",
    );
    assert!(out.contains("250 STARTTLS\r\n"), "{out}");
    assert!(
        out.ends_with("220 2.0.0 Ready to start TLS\r\n--TLS--\n221 2.0.0 Bye\r\n"),
        "{out}"
    );
}

#[test]
fn required_tls_refuses_plain_logins_and_allows_them_after_stls() {
    let user = seeded("required");
    let inetd = Inetd::start(
        proxy_bin(),
        &pop3_args(&client_tls("starttls", &["--client-tls-required"])),
        &[],
    );
    let out = python_ok(
        "import os,poplib,ssl\n\
         p=poplib.POP3('127.0.0.1',int(os.environ['PORT']))\n\
         try:\n    p.user(os.environ['U'])\nexcept poplib.error_proto as e:\n    print(e.args[0].decode())\n\
         p.stls(context=ssl.create_default_context(cafile=os.environ['CA']))\n\
         p.user(os.environ['U']); print(p.pass_(os.environ['P']).decode()); p.quit()",
        &[
            ("PORT", &inetd.port.to_string()),
            ("CA", &ca()),
            ("U", &user.name),
            ("P", &user.password),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "-ERR [AUTH] Plain-text logins are disabled: use STLS (or port 995) first\n+OK Logged in.\n"
    );
}

#[test]
fn smtp_starttls_and_smtps_with_swaks_and_smtplib_and_required_tls() {
    let relay_account = servers().new_user("tls-relay");
    let rcpt = servers().new_user("tls-rcpt");
    let (args, env) = smtp_args(
        &relay_account,
        &client_tls("starttls", &["--client-tls-required"]),
    );
    let starttls = Inetd::start(proxy_bin(), &args, &env);
    let (args, env) = smtp_args(&relay_account, &client_tls("implicit", &[]));
    let implicit = Inetd::start(proxy_bin(), &args, &env);
    let swaks = require_client("swaks");
    for (port, tls) in [(starttls.port, "--tls"), (implicit.port, "--tlsc")] {
        let out = Command::new(&swaks)
            .args(["--server", "127.0.0.1", "--port", &port.to_string(), tls])
            .args([
                "--tls-verify",
                "--tls-ca-path",
                &ca(),
                "--tls-sni",
                "localhost",
            ])
            .args(["--from", &relay_account.email, "--to", &rcpt.email])
            .args(["--header", "Subject: swaks over client TLS"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "swaks {tls}: {}", text(&out));
    }
    // smtplib: plain MAIL refused (TLS required), then STARTTLS; and SMTPS.
    let out = python_ok(
        "import os,smtplib,ssl\n\
         ctx=ssl.create_default_context(cafile=os.environ['CA'])\n\
         m='Subject: smtplib over client TLS\\r\\n\\r\\nhi\\r\\n'\n\
         s=smtplib.SMTP('127.0.0.1',int(os.environ['STARTTLS']))\n\
         s.ehlo(); print('starttls' in s.esmtp_features)\n\
         print(s.mail(os.environ['FROM']))\n\
         s.starttls(context=ctx); s.ehlo(); print('starttls' in s.esmtp_features)\n\
         print(s.sendmail(os.environ['FROM'],[os.environ['TO']],m)); s.quit()\n\
         s=smtplib.SMTP_SSL('127.0.0.1',int(os.environ['IMPLICIT']),context=ctx)\n\
         print(s.sendmail(os.environ['FROM'],[os.environ['TO']],m)); s.quit()",
        &[
            ("CA", &ca()),
            ("STARTTLS", &starttls.port.to_string()),
            ("IMPLICIT", &implicit.port.to_string()),
            ("FROM", &relay_account.email),
            ("TO", &rcpt.email),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "True\n(530, b'5.7.0 Must issue a STARTTLS command first')\nFalse\n{}\n{}\n"
    );
    common::wait_for_messages(&rcpt, 4);
}

/// `openssl s_client VERSION` to the implicit-TLS POP3 port; returns its output.
fn s_client(port: u16, version: &str) -> Output {
    Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            version,
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ])
        .args(["-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            // QUIT ends an accepted session; a refused one ends with the handshake.
            let _ = child.stdin.take().unwrap().write_all(b"QUIT\r\n");
            child.wait_with_output()
        })
        .unwrap()
}

#[test]
fn tls_1_0_and_1_1_only_with_the_legacy_setting_and_refusals_are_logged() {
    let modern = Inetd::start(proxy_bin(), &pop3_args(&client_tls("implicit", &[])), &[]);
    let legacy = Inetd::start(
        proxy_bin(),
        &pop3_args(&client_tls(
            "implicit",
            &["--client-tls-min-version", "1.0"],
        )),
        &[],
    );
    for version in ["-tls1", "-tls1_1"] {
        let refused = s_client(modern.port, version);
        assert!(
            !text(&refused).contains("+OK"),
            "{version}: {}",
            text(&refused)
        );
        let accepted = s_client(legacy.port, version);
        assert!(
            String::from_utf8_lossy(&accepted.stdout).contains("+OK legacy-mail-proxy POP3 ready."),
            "{version}: {}",
            text(&accepted)
        );
    }
    let logs = modern.logs();
    assert_eq!(
        logs.matches("client TLS handshake with 127.0.0.1:").count(),
        2,
        "{logs}"
    );
    assert!(logs.contains("unsupported protocol"), "{logs}");
    let logs = legacy.logs();
    assert!(logs.contains(": TLSv1 "), "{logs}");
    assert!(logs.contains(": TLSv1.1 "), "{logs}");
}

#[test]
fn bad_certificate_or_key_files_are_logged_and_the_client_is_told_to_retry() {
    let t = &servers().tls;
    let missing = servers().dir.join("no-such-cert.pem");
    let cases = [
        (
            missing.clone(),
            t.server_key.clone(),
            "cannot load the client TLS certificate",
        ),
        (
            t.server_cert.clone(),
            t.server_cert.clone(),
            "cannot load the client TLS key",
        ),
        (
            t.server_cert.clone(),
            t.untrusted_key.clone(),
            "key values mismatch",
        ),
    ];
    let account = servers().new_user("badcert");
    for (cert, key, why) in cases {
        let tls = strings(&[
            "--client-tls",
            "starttls",
            "--client-tls-cert",
            cert.to_str().unwrap(),
            "--client-tls-key",
            key.to_str().unwrap(),
        ]);
        let (smtp, env) = smtp_args(&account, &tls);
        for (args, env, reply) in [
            (pop3_args(&tls), vec![], "-ERR [SYS/TEMP] "),
            (smtp, env, "421 4.3.5 "),
        ] {
            let started = Instant::now();
            let out = Command::new(proxy_bin())
                .args(&args)
                .envs(env)
                .stdin(Stdio::piped())
                .output()
                .unwrap();
            let (stdout, log) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert!(stdout.starts_with(reply), "{stdout}");
            assert_eq!(stdout.lines().count(), 1, "{stdout}");
            assert!(
                log.contains("client TLS configuration error") && log.contains(why),
                "{log}"
            );
            assert!(started.elapsed() < Duration::from_secs(10));
        }
    }
    // No certificate at all is a configuration error too (not silently plain text).
    let out = Command::new(proxy_bin())
        .args(pop3_args(&strings(&["--client-tls", "implicit"])))
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        text(&out).contains("--client-tls needs --client-tls-cert"),
        "{}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("-ERR [SYS/TEMP] "));
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let inetd = Inetd::start(
        proxy_bin(),
        &pop3_args(&client_tls(
            "implicit",
            &["--client-tls-handshake-timeout", "1"],
        )),
        &[],
    );
    let out = python(
        "import os,socket,time\n\
         s=socket.create_connection(('127.0.0.1',int(os.environ['PORT'])))\n\
         t=time.monotonic(); s.settimeout(30)\n\
         print(s.recv(100), round(time.monotonic()-t,1))",
        &[("PORT", &inetd.port.to_string())],
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let (bytes, seconds) = said.trim().split_once(' ').unwrap();
    assert_eq!(bytes, "b''", "{said}");
    let seconds: f64 = seconds.parse().unwrap();
    assert!((0.9..5.0).contains(&seconds), "held for {seconds} s");
    let logs = inetd.logs();
    assert!(
        logs.contains("client TLS handshake with 127.0.0.1:")
            && logs.contains("no handshake within 1 s"),
        "{logs}"
    );
}

/// The benchmark's connect workload (login, STAT, QUIT in a fresh session) with client TLS
/// off, with a certificate loaded but unused (STLS offered, plain session), and with
/// POP3S. Not part of the suite (`--ignored`, `--nocapture`): it prints the medians, and
/// tests/bench/RESULTS-client-tls.md keeps them. Build profile: whatever `cargo test`
/// uses (debug for our code, dependencies at opt-level 2).
#[test]
#[ignore]
fn client_tls_connect_benchmark() {
    let user = seeded("bench");
    let rounds = std::env::var("LMP_BENCH_SESSIONS").unwrap_or_else(|_| "100".into());
    let columns = [
        ("off", pop3_args(&[]), false),
        (
            "cert loaded, plain",
            pop3_args(&client_tls("starttls", &[])),
            false,
        ),
        ("POP3S", pop3_args(&client_tls("implicit", &[])), true),
    ];
    let inetds: Vec<(&str, Inetd, bool)> = columns
        .into_iter()
        .map(|(name, args, tls)| (name, Inetd::start(proxy_bin(), &args, &[]), tls))
        .collect();
    let ports: Vec<String> = inetds
        .iter()
        .map(|(_, inetd, tls)| format!("{}:{}", inetd.port, u8::from(*tls)))
        .collect();
    // Rotating order, so that load from outside hits every column alike.
    let out = python_ok(
        "import os,poplib,ssl,statistics,time\n\
         ctx=ssl.create_default_context(cafile=os.environ['CA'])\n\
         cols=[(int(p),t=='1') for p,t in (c.split(':') for c in os.environ['COLS'].split())]\n\
         times=[[] for _ in cols]\n\
         for r in range(int(os.environ['N'])):\n\
         \x20   for i in range(len(cols)):\n\
         \x20       j=(i+r)%len(cols); port,tls=cols[j]; t=time.perf_counter()\n\
         \x20       p=poplib.POP3_SSL('127.0.0.1',port,context=ctx) if tls else poplib.POP3('127.0.0.1',port)\n\
         \x20       p.user(os.environ['U']); p.pass_(os.environ['P']); p.stat(); p.quit()\n\
         \x20       times[j].append(time.perf_counter()-t)\n\
         for ts in times:\n\
         \x20   ts.sort(); print('%.1f %.1f %.1f' % (statistics.median(ts)*1000, ts[len(ts)//10]*1000, ts[len(ts)*9//10]*1000))",
        &[
            ("CA", &ca()),
            ("COLS", &ports.join(" ")),
            ("N", &rounds),
            ("U", &user.name),
            ("P", &user.password),
        ],
    );
    let out = String::from_utf8_lossy(&out);
    println!("{rounds} sessions each; per session in ms: median (p10–p90)");
    for ((name, _, _), line) in inetds.iter().zip(out.lines()) {
        let v: Vec<&str> = line.split(' ').collect();
        println!("{name}: {} ({}–{})", v[0], v[1], v[2]);
    }
}

#[test]
fn make_cert_writes_a_pair_that_clients_can_pin() {
    let dir = servers().dir.join("make-cert");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("lab.pem"), dir.join("lab.key"));
    let out = Command::new(proxy_bin())
        .args(["make-cert", "--host", "localhost", "--host", "127.0.0.1"])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let tls = strings(&[
        "--client-tls",
        "implicit",
        "--client-tls-cert",
        cert.to_str().unwrap(),
        "--client-tls-key",
        key.to_str().unwrap(),
    ]);
    let inetd = Inetd::start(proxy_bin(), &pop3_args(&tls), &[]);
    // The client trusts exactly this certificate, and checks the name (an IP here).
    let out = python_ok(
        "import os,poplib,ssl\n\
         ctx=ssl.create_default_context(cafile=os.environ['CERT'])\n\
         p=poplib.POP3_SSL('127.0.0.1',int(os.environ['PORT']),context=ctx)\n\
         print(p.getwelcome().decode()); p.quit()",
        &[
            ("PORT", &inetd.port.to_string()),
            ("CERT", cert.to_str().unwrap()),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "+OK legacy-mail-proxy POP3 ready.\n"
    );
}
