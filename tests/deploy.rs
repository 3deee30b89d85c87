//! The shipped deployments, run for real: Debian's `xinetd` with the files in `xinetd/`,
//! `systemd-socket-activate` with the exact `ExecStart=` of the units in `systemd/`,
//! `systemd-analyze verify` on the units, and `systemd-sysusers`/`systemd-tmpfiles` on the
//! user and lock-directory files, against the test Dovecot and Postfix.
//!
//! The shipped files are copied and rewritten programmatically, changing only ports,
//! paths, the user, and the example servers' addresses and accounts; every other line is
//! used as shipped, and each rewrite checks that it found what it replaces.
//!
//! These tests fail (never skip) when xinetd or the systemd tools are missing, naming the
//! package to install.

mod common;

use common::{
    User, imap_fetch_all, missing_program_message, postfix, proxy_bin, python, require_client,
    servers, wait_for_messages, wait_until,
};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The unprivileged user the rewritten xinetd files run the proxy as (Debian's).
const RUN_AS: (&str, &str) = ("nobody", "nogroup");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn shipped(path: &str) -> String {
    fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A program from the systemd package, or a failure that says how to install it.
fn require_systemd_tool(program: &str) -> PathBuf {
    common::which(program).unwrap_or_else(|| {
        panic!(
            "`{program}` is not installed. Install it with:\n  \
             apt-get install -y --no-install-recommends systemd\n{}",
            missing_program_message(program)
        )
    })
}

/// A fresh directory for one test, inside the harness directory (removed at exit) when the
/// servers run, else under the system temp directory.
fn scratch(name: &str, with_servers: bool) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = if with_servers {
        servers().dir.clone()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "deploy-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------
// systemd unit files

/// `[Section] Key=Value` entries of a unit file, in order (a key may repeat).
fn unit_entries(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not Key=Value: {line}"));
        entries.push((section.clone(), key.to_string(), value.to_string()));
    }
    entries
}

fn unit_values(unit: &str, section: &str, key: &str) -> Vec<String> {
    unit_entries(unit)
        .into_iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v)
        .collect()
}

fn unit_value(unit: &str, section: &str, key: &str) -> String {
    let values = unit_values(unit, section, key);
    assert_eq!(values.len(), 1, "[{section}] {key}= set {values:?}");
    values[0].clone()
}

/// `VAR=value` lines of a shipped env file; with `uncomment`, also the commented-out
/// `#VAR=value` examples for those variables.
fn env_file(path: &str, uncomment: &[&str]) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in shipped(path).lines() {
        let line = match line.strip_prefix('#') {
            Some(rest) if uncomment.iter().any(|v| rest.starts_with(&format!("{v}="))) => rest,
            _ => line,
        };
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap();
        vars.insert(k.to_string(), v.to_string());
    }
    for v in uncomment {
        assert!(vars.contains_key(*v), "{path} has no {v} example");
    }
    vars
}

const SERVICES: [&str; 3] = [
    "legacy-mail-proxy-pop3",
    "legacy-mail-proxy-smtp",
    "legacy-mail-proxy-tunnel",
];

/// Copies the units (and the several-backends example, with its unchanged copy of the
/// template) into `dir`, pointing ExecStart at the test binary: `systemd-analyze verify`
/// checks that the program exists.
fn units_for_verify(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let bin = "/usr/local/bin/legacy-mail-proxy";
    let mut copy = |from: &str, to: &str| {
        let unit = shipped(from);
        if to.ends_with(".service") {
            assert!(unit.contains(&format!("ExecStart={bin} ")), "{from}");
        }
        let path = dir.join(to);
        fs::write(&path, unit.replace(bin, proxy_bin())).unwrap();
        files.push(path);
    };
    for name in SERVICES {
        copy(&format!("systemd/{name}.socket"), &format!("{name}.socket"));
        copy(
            &format!("systemd/{name}@.service"),
            &format!("{name}@.service"),
        );
    }
    copy(
        "systemd/legacy-mail-proxy-queue.service",
        "legacy-mail-proxy-queue.service",
    );
    copy(
        "systemd/legacy-mail-proxy-queue.timer",
        "legacy-mail-proxy-queue.timer",
    );
    copy(
        "systemd/examples/legacy-mail-proxy-pop3-work.socket",
        "legacy-mail-proxy-pop3-work.socket",
    );
    copy(
        "systemd/legacy-mail-proxy-pop3@.service",
        "legacy-mail-proxy-pop3-work@.service",
    );
    files
}

#[test]
fn systemd_analyze_verify_is_clean() {
    let analyze = require_systemd_tool("systemd-analyze");
    let dir = scratch("verify", false);
    let files = units_for_verify(&dir);
    let out = Command::new(analyze)
        .arg("verify")
        .args(&files)
        .output()
        .unwrap();
    let report = text(&out);
    let _ = fs::remove_dir_all(&dir);
    assert!(out.status.success(), "systemd-analyze verify: {report}");
    assert!(report.trim().is_empty(), "systemd-analyze verify: {report}");
}

#[test]
fn systemd_security_exposure_is_low() {
    let analyze = require_systemd_tool("systemd-analyze");
    let dir = scratch("security", false);
    units_for_verify(&dir);
    for name in SERVICES {
        let out = Command::new(&analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(dir.join(format!("{name}@.service")))
            .output()
            .unwrap();
        let report = text(&out);
        let level: f64 = report
            .lines()
            .find_map(|l| l.split("exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in: {report}"));
        // systemd rates below 2.0 as "OK"; a missing hardening setting pushes it above.
        assert!(level < 2.0, "{name}: exposure {level}\n{report}");
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn systemd_units_have_the_settings_the_deployment_needs() {
    let sysusers = shipped("systemd/legacy-mail-proxy.sysusers");
    let tmpfiles = shipped("systemd/legacy-mail-proxy.tmpfiles");
    for name in SERVICES {
        let socket = shipped(&format!("systemd/{name}.socket"));
        assert_eq!(unit_value(&socket, "Socket", "Accept"), "yes", "{name}");
        assert!(
            unit_value(&socket, "Socket", "ListenStream").starts_with("127.0.0.1:"),
            "{name}"
        );
        for key in ["MaxConnections", "MaxConnectionsPerSource"] {
            let n: u32 = unit_value(&socket, "Socket", key).parse().unwrap();
            assert!((1..=100).contains(&n), "{name} {key}={n}");
        }

        let service = shipped(&format!("systemd/{name}@.service"));
        let get = |key: &str| unit_value(&service, "Service", key);
        assert_eq!(get("StandardInput"), "socket", "{name}");
        assert_eq!(get("StandardOutput"), "socket", "{name}");
        assert_eq!(get("StandardError"), "journal", "{name}");
        assert!(get("ExecStart").contains(" --log stderr "), "{name}");
        assert_eq!(get("EnvironmentFile"), "/etc/legacy-mail-proxy/%p.env");
        let user = get("User");
        assert!(user != "root" && !user.is_empty(), "{name}");
        assert!(
            sysusers.contains(&format!("\nu {user} ")),
            "sysusers makes no {user}"
        );
        for key in ["DynamicUser", "RuntimeDirectory"] {
            // Either would give each connection its own lock directory (see the README).
            assert!(
                unit_values(&service, "Service", key).is_empty(),
                "{name} {key}"
            );
        }
        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("CapabilityBoundingSet", ""),
            ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ] {
            assert_eq!(get(key), value, "{name} {key}");
        }
        assert!(
            unit_values(&service, "Service", "SystemCallFilter")
                .contains(&"@system-service".into()),
            "{name}"
        );
        assert!(!get("MemoryMax").is_empty(), "{name}");

        // The env file the README installs for this unit exists and holds no password.
        let env = shipped(&format!("systemd/{name}.env"));
        assert!(!env.contains("PASSWORD="), "{name}.env");
    }

    // Credentials: exactly the names the program reads from $CREDENTIALS_DIRECTORY,
    // loaded from the credential store (a missing one is skipped, not fatal).
    for (name, ids) in [
        (
            "legacy-mail-proxy-pop3",
            ["imap-password", "client-password"],
        ),
        (
            "legacy-mail-proxy-smtp",
            ["smtp-password", "client-password"],
        ),
    ] {
        let service = shipped(&format!("systemd/{name}@.service"));
        let loaded = unit_values(&service, "Service", "LoadCredential");
        let mut expected: Vec<String> = ids.iter().map(|id| format!("{id}:%p.{id}")).collect();
        // The OAuth2 client secret belongs to the provider's app registration, shared by
        // the admin commands and both gateways: one credential for all.
        expected.push("oauth2-client-secret:legacy-mail-proxy.oauth2-client-secret".into());
        assert_eq!(loaded, expected, "{name}");
        // The OAuth2 token store: the default --oauth2-dir, writable under
        // ProtectSystem=strict, one directory for every instance (no %i in it).
        // smtp also keeps POP-before-SMTP's time stamps (--pop-before-smtp-dir) and the
        // queue (--queue-dir, shared with legacy-mail-proxy-queue.service) there.
        let expected = match name {
            "legacy-mail-proxy-smtp" => {
                "legacy-mail-proxy/oauth2 legacy-mail-proxy/pop-before-smtp legacy-mail-proxy/queue"
            }
            _ => "legacy-mail-proxy/oauth2",
        };
        assert_eq!(
            unit_value(&service, "Service", "StateDirectory"),
            expected,
            "{name}"
        );
        assert_eq!(
            unit_value(&service, "Service", "StateDirectoryMode"),
            "0700"
        );
    }

    // The lock directory: the one pop3 uses, writable by the service, made by tmpfiles for
    // the service user, shared by all instances.
    let pop3 = shipped("systemd/legacy-mail-proxy-pop3@.service");
    let lock_dir = env_file("systemd/legacy-mail-proxy-pop3.env", &[])["LMP_LOCK_DIR"].clone();
    assert_eq!(lock_dir, "/run/lock/legacy-mail-proxy");
    assert_eq!(unit_value(&pop3, "Service", "ReadWritePaths"), lock_dir);
    let user = unit_value(&pop3, "Service", "User");
    assert!(
        tmpfiles.contains(&format!("\nd {lock_dir} 0700 {user} {user} -")),
        "{tmpfiles}"
    );
}

#[test]
fn the_queue_runner_shares_the_smtp_gateways_settings_queue_and_hardening() {
    let smtp = shipped("systemd/legacy-mail-proxy-smtp@.service");
    let runner = shipped("systemd/legacy-mail-proxy-queue.service");
    let timer = shipped("systemd/legacy-mail-proxy-queue.timer");
    let get = |unit: &str, key: &str| unit_value(unit, "Service", key);
    assert_eq!(get(&runner, "Type"), "oneshot");
    assert!(get(&runner, "ExecStart").ends_with(" --log stderr queue run"));
    // The same settings, so each message goes out through the same backend and login.
    assert_eq!(
        get(&runner, "EnvironmentFile"),
        "/etc/legacy-mail-proxy/legacy-mail-proxy-smtp.env"
    );
    assert!(
        unit_values(&runner, "Service", "LoadCredential")
            .contains(&"smtp-password:legacy-mail-proxy-smtp.smtp-password".to_string())
    );
    assert_eq!(get(&runner, "User"), get(&smtp, "User"));
    // One queue directory for every connection and every run, at the env file's example
    // path, made for the fixed user and writable under ProtectSystem=strict.
    let queue_dir =
        env_file("systemd/legacy-mail-proxy-smtp.env", &["LMP_QUEUE_DIR"])["LMP_QUEUE_DIR"].clone();
    assert_eq!(queue_dir, "/var/lib/legacy-mail-proxy/queue");
    for unit in [&smtp, &runner] {
        let state = get(unit, "StateDirectory");
        assert!(
            state.split(' ').any(|d| d == "legacy-mail-proxy/queue"),
            "{state}"
        );
        assert_eq!(get(unit, "StateDirectoryMode"), "0700");
        assert!(unit_values(unit, "Service", "RuntimeDirectory").is_empty());
        assert!(unit_values(unit, "Service", "DynamicUser").is_empty());
    }
    // The runner is hardened like the gateway: every setting of the gateway's from
    // NoNewPrivileges= on is the same.
    let hardening = |unit: &str| -> Vec<(String, String, String)> {
        let entries = unit_entries(unit);
        let at = entries
            .iter()
            .position(|(_, k, _)| k == "NoNewPrivileges")
            .unwrap();
        entries[at..].to_vec()
    };
    assert_eq!(hardening(&runner), hardening(&smtp));
    assert_eq!(unit_value(&timer, "Timer", "OnCalendar"), "minutely");
    assert_eq!(unit_value(&timer, "Install", "WantedBy"), "timers.target");

    // Under xinetd: the cron line, with the same queue directory and a `queue run`.
    let cron = shipped("xinetd/legacy-mail-proxy-queue.cron");
    let xinetd = shipped("xinetd/legacy-mail-proxy-smtp");
    assert!(xinetd.contains("legacy-mail-proxy-queue.cron"));
    let vars: BTreeMap<&str, &str> = cron
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('*'))
        .filter_map(|l| l.split_once('='))
        .collect();
    assert_eq!(vars["LMP_QUEUE_DIR"], queue_dir);
    assert_eq!(vars["LMP_LOG"], "syslog");
    assert!(!cron.contains("PASSWORD="), "only a password file");
    let job = cron.lines().find(|l| l.starts_with("* * * * * ")).unwrap();
    assert_eq!(
        job,
        "* * * * * legacy-mail-proxy /usr/local/bin/legacy-mail-proxy queue run"
    );
}

#[test]
fn the_queue_cron_settings_run_queue_run_as_shipped() {
    // The cron file's variables, as cron would set them, with only the backend's address,
    // login and queue directory changed to the test servers'.
    let s = servers();
    let account = s.new_user("qcron");
    let rcpt = s.new_user("qcronrcpt");
    let dir = scratch("queue-cron", true);
    let queue = dir.join("queue");
    let password = password_file(&dir, "smtp-password", &account.password);
    let cron = shipped("xinetd/legacy-mail-proxy-queue.cron");
    let mut vars: BTreeMap<String, String> = cron
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('*'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (key, value) in [
        ("LMP_SMTP_HOST", "127.0.0.1".to_string()),
        ("LMP_SMTP_PORT", postfix().submissions_port.to_string()),
        ("LMP_SMTP_USER", account.name.clone()),
        ("LMP_SMTP_PASSWORD_FILE", password),
        ("LMP_QUEUE_DIR", queue.display().to_string()),
    ] {
        assert!(vars.insert(key.into(), value).is_some(), "{key}");
    }
    vars.insert("LMP_CA_FILE".into(), s.ca_file.display().to_string());
    vars.insert("LMP_LOG".into(), "stderr".into());
    let run = |vars: &BTreeMap<String, String>, args: &[&str], input: &[u8]| {
        let mut child = Command::new(proxy_bin())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(vars)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    // A message queued while the backend is unreachable…
    let mut down = vars.clone();
    down.insert("LMP_SMTP_PORT".into(), "1".into());
    // The xinetd side's own client login is not in the cron file; open for this test.
    down.insert("LMP_CLIENT_AUTH".into(), "none".into());
    let message = "From: <cron@example.test>\r\nSubject: cron\r\nDate: Sat, 22 Nov 2025 00:32:00 +0000\r\nMessage-ID: <cron@x>\r\n\r\nhi\r\n";
    let session = format!(
        "HELO x\r\nMAIL FROM:<{}>\r\nRCPT TO:<{}>\r\nDATA\r\n{message}.\r\nQUIT\r\n",
        account.email, rcpt.email
    );
    let out = run(&down, &["smtp"], session.as_bytes());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("queued as "),
        "{}",
        text(&out)
    );
    // …goes out with the cron job's command line.
    let job = cron.lines().find(|l| l.starts_with("* * * * * ")).unwrap();
    let argv: Vec<&str> = job.split_whitespace().skip(7).collect();
    assert_eq!(argv, ["queue", "run"]);
    let out = run(&vars, &argv, b"");
    assert!(out.status.success(), "{}", text(&out));
    wait_for_messages(&rcpt, 1);
    assert!(imap_fetch_all(&rcpt)[0].1.ends_with(message.as_bytes()));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_the_shared_lock_directory() {
    let sysusers = require_systemd_tool("systemd-sysusers");
    let tmpfiles = require_systemd_tool("systemd-tmpfiles");
    let root = scratch("root", false);
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("run/lock")).unwrap();
    let out = Command::new(sysusers)
        .arg(format!("--root={}", root.display()))
        .arg(repo("systemd/legacy-mail-proxy.sysusers"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("legacy-mail-proxy:"))
        .unwrap_or_else(|| panic!("no user: {passwd}"));
    let fields: Vec<&str> = entry.split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system user: {entry}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{entry}");

    let out = Command::new(tmpfiles)
        .arg(format!("--root={}", root.display()))
        .arg("--create")
        .arg(repo("systemd/legacy-mail-proxy.tmpfiles"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    use std::os::unix::fs::MetadataExt;
    let lock = fs::metadata(root.join("run/lock/legacy-mail-proxy")).unwrap();
    assert!(lock.is_dir());
    assert_eq!(lock.uid(), uid);
    assert_eq!(lock.mode() & 0o777, 0o700);
    let _ = fs::remove_dir_all(&root);
}

/// `systemd-socket-activate --inetd -a` running the unit's exact ExecStart= (only the
/// binary's path changed) with the unit's env file and credentials, stderr in a file that
/// stands for the journal.
struct SocketActivate {
    child: Child,
    port: u16,
    journal: PathBuf,
}

impl SocketActivate {
    fn start(
        unit: &str,
        env: &BTreeMap<String, String>,
        credentials: &[(&str, &str)],
    ) -> SocketActivate {
        let tool = require_client("systemd-socket-activate");
        let service = shipped(&format!("systemd/{unit}@.service"));
        let exec = unit_value(&service, "Service", "ExecStart");
        let mut argv: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(argv[0], "/usr/local/bin/legacy-mail-proxy");
        argv[0] = proxy_bin();
        let dir = scratch(unit, true);
        let mut command = Command::new(tool);
        // LoadCredential=ID:… puts each credential in $CREDENTIALS_DIRECTORY/ID.
        if !credentials.is_empty() {
            let ids: Vec<String> = unit_values(&service, "Service", "LoadCredential")
                .iter()
                .map(|c| c.split(':').next().unwrap().to_string())
                .collect();
            let creds = dir.join("credentials");
            fs::create_dir(&creds).unwrap();
            for (id, secret) in credentials {
                assert!(ids.iter().any(|i| i == id), "{unit} loads no {id}");
                fs::write(creds.join(id), secret).unwrap();
            }
            command.arg(format!(
                "--setenv=CREDENTIALS_DIRECTORY={}",
                creds.display()
            ));
        }
        for (k, v) in env {
            command.arg(format!("--setenv={k}={v}"));
        }
        let port = free_port();
        let journal = dir.join("journal");
        let child = command
            .args(["--inetd", "-a", "-l", &format!("127.0.0.1:{port}")])
            .args(&argv)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&journal).unwrap())
            .spawn()
            .unwrap();
        let activate = SocketActivate {
            child,
            port,
            journal,
        };
        wait_until(
            "systemd-socket-activate listening",
            Duration::from_secs(10),
            || activate.journal().contains("Listening on"),
        );
        activate
    }

    fn journal(&self) -> String {
        fs::read_to_string(&self.journal).unwrap_or_default()
    }
}

impl Drop for SocketActivate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw line-based session: sends each command, reads its reply (until a line starting
/// with `end`), and returns every byte the client received.
fn transcript(port: u16, steps: &[(&str, &str)]) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut all = String::new();
    for (command, end) in steps {
        writer.write_all(command.as_bytes()).unwrap();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                panic!("closed while waiting for {end:?}: {all}");
            }
            all.push_str(&line);
            if line.starts_with(end) {
                break;
            }
        }
    }
    all
}

/// Log text that must never reach a client.
fn assert_no_log_text(received: &str, journal: &str) {
    for marker in ["legacy-mail-proxy[", "INFO", "WARN", "ERROR", "DEBUG"] {
        assert!(
            !received.contains(marker),
            "log text {marker:?} reached the client:\n{received}\njournal:\n{journal}"
        );
    }
}

fn pop3_env(uncomment: &[&str], overrides: &[(&str, &str)]) -> BTreeMap<String, String> {
    let s = servers();
    let mut env = env_file("systemd/legacy-mail-proxy-pop3.env", uncomment);
    let lock = scratch("locks", true);
    for (k, v) in [
        ("LMP_IMAP_HOST", s.host.to_string()),
        ("LMP_IMAP_PORT", s.imaps_port.to_string()),
        ("LMP_LOCK_DIR", lock.display().to_string()),
    ] {
        assert!(env.insert(k.into(), v).is_some(), "the env file sets {k}");
    }
    env.insert("LMP_CA_FILE".into(), s.ca_file.display().to_string());
    for (k, v) in overrides {
        assert!(env.insert(k.to_string(), v.to_string()).is_some(), "{k}");
    }
    env
}

#[test]
fn socket_activated_pop3_runs_the_units_exec_start_and_logs_only_to_the_journal() {
    let s = servers();
    let user = s.new_user("activate-pop3");
    user.seed_many(&[b"Subject: activated\r\n\r\nhello\r\n"]);
    let activate = SocketActivate::start("legacy-mail-proxy-pop3", &pop3_env(&[], &[]), &[]);
    let received = transcript(
        activate.port,
        &[
            ("", "+OK"),
            (&format!("USER {}\r\n", user.name), "+OK"),
            (&format!("PASS {}\r\n", user.password), "+OK"),
            ("STAT\r\n", "+OK"),
            ("RETR 1\r\n", ".\r\n"),
            ("QUIT\r\n", "+OK"),
        ],
    );
    assert!(received.contains("\r\n+OK 1 "), "{received}");
    assert!(received.contains("\r\nhello\r\n.\r\n"), "{received}");
    wait_until(
        "the session's last log line",
        Duration::from_secs(10),
        || activate.journal().contains("pop3 session end"),
    );
    let journal = activate.journal();
    assert!(
        journal.contains("INFO: pop3 connect from 127.0.0.1"),
        "{journal}"
    );
    assert_no_log_text(&received, &journal);
}

#[test]
fn socket_activated_pop3_reads_the_credentials_and_locks_across_instances() {
    let s = servers();
    let user = s.new_user("activate-fixed");
    user.seed_many(&[b"Subject: fixed\r\n\r\nfixed\r\n"]);
    let env = pop3_env(
        &["LMP_AUTH", "LMP_IMAP_USER", "LMP_CLIENT_USER"],
        &[("LMP_IMAP_USER", &user.name)],
    );
    let client_user = env["LMP_CLIENT_USER"].clone();
    let activate = SocketActivate::start(
        "legacy-mail-proxy-pop3",
        &env,
        &[
            ("imap-password", &format!("{}\n", user.password)),
            ("client-password", "client secret\n"),
        ],
    );
    let user_command = format!("USER {client_user}\r\n");

    // Hold the mailbox in one instance; a second, separate process must find it locked.
    let stream = TcpStream::connect(("127.0.0.1", activate.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut first = BufReader::new(stream);
    for command in ["", &user_command, "PASS client secret\r\n"] {
        first.get_mut().write_all(command.as_bytes()).unwrap();
        let mut line = String::new();
        first.read_line(&mut line).unwrap();
        assert!(line.starts_with("+OK"), "{line}{}", activate.journal());
    }
    let second = transcript(
        activate.port,
        &[
            ("", "+OK"),
            (&user_command, "+OK"),
            ("PASS client secret\r\n", "-ERR"),
        ],
    );
    assert!(second.contains("-ERR [IN-USE]"), "{second}");

    first.get_mut().write_all(b"STAT\r\nQUIT\r\n").unwrap();
    let mut rest = String::new();
    first.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("+OK 1 "), "{rest}");
    assert_no_log_text(&(second + &rest), &activate.journal());
}

#[test]
fn socket_activated_smtp_uses_its_credentials_and_delivers() {
    let s = servers();
    let p = postfix();
    let account = s.new_user("activate-smtp");
    let mut env = env_file(
        "systemd/legacy-mail-proxy-smtp.env",
        &["LMP_CLIENT_AUTH", "LMP_SMTP_USER", "LMP_CLIENT_USER"],
    );
    for (k, v) in [
        ("LMP_SMTP_HOST", s.host.to_string()),
        ("LMP_SMTP_PORT", p.submissions_port.to_string()),
        ("LMP_SMTP_USER", account.name.clone()),
    ] {
        assert!(env.insert(k.into(), v).is_some(), "{k}");
    }
    env.insert("LMP_CA_FILE".into(), s.ca_file.display().to_string());
    assert_eq!(env["LMP_CLIENT_AUTH"], "local");
    let client_user = env["LMP_CLIENT_USER"].clone();
    let activate = SocketActivate::start(
        "legacy-mail-proxy-smtp",
        &env,
        &[
            ("smtp-password", &account.password),
            ("client-password", "client secret"),
        ],
    );
    let out = python(
        SMTPLIB_SEND,
        &[
            ("T_PORT", &activate.port.to_string()),
            ("T_SOURCE", "127.0.0.1"),
            ("T_USER", &client_user),
            ("T_PASS", "client secret"),
            ("T_FROM", &account.email),
            ("T_TO", &account.email),
            ("T_COUNT", "1"),
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        activate.journal()
    );
    wait_for_messages(&account, 1);
    assert_no_log_text(&String::from_utf8_lossy(&out.stdout), &activate.journal());
}

#[test]
fn socket_activated_tunnel_joins_a_plain_client_to_imaps() {
    let s = servers();
    let user = s.new_user("activate-tunnel");
    user.seed_many(&[b"Subject: tunnelled\r\n\r\nvia tunnel\r\n"]);
    let mut env = env_file("systemd/legacy-mail-proxy-tunnel.env", &[]);
    let connect = format!("{}:{}", s.host, s.imaps_port);
    assert!(env.insert("LMP_CONNECT".into(), connect).is_some());
    env.insert("LMP_CA_FILE".into(), s.ca_file.display().to_string());
    let activate = SocketActivate::start("legacy-mail-proxy-tunnel", &env, &[]);
    let received = transcript(
        activate.port,
        &[
            ("", "* OK"),
            (
                &format!("a LOGIN {} {}\r\n", user.name, user.password),
                "a OK",
            ),
            ("b SELECT INBOX\r\n", "b OK"),
            ("c FETCH 1 BODY[TEXT]\r\n", "c OK"),
            ("d LOGOUT\r\n", "d OK"),
        ],
    );
    assert!(received.contains("via tunnel\r\n"), "{received}");
    assert_no_log_text(&received, &activate.journal());
}

// ---------------------------------------------------------------------------------------
// xinetd

/// One `attribute = value` line of an xinetd service, as a rewrite.
enum Change<'a> {
    /// Replace the attribute's whole value.
    Set(&'a str, String),
    /// In `env`, replace the value of a variable that is there.
    Env(&'a str, String),
    /// In `env`, add a variable (a path the shipped file leaves to the system default,
    /// such as the CA file).
    AddEnv(&'a str, String),
}

/// Rewrites one `service NAME { … }` block of a shipped xinetd file. Every change must hit
/// exactly one existing line or variable; all other lines stay as shipped.
fn rewrite_service(file: &str, service: &str, changes: &[Change]) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    let mut hits = vec![0; changes.len()];
    for line in file.lines() {
        let trimmed = line.trim();
        if trimmed == format!("service {service}") {
            inside = true;
        } else if trimmed.starts_with("service ") {
            inside = false;
        }
        let Some((attribute, value)) = trimmed.split_once('=').filter(|_| inside) else {
            out.push(line.to_string());
            continue;
        };
        let attribute = attribute.trim();
        let mut value = value.trim().to_string();
        for (i, change) in changes.iter().enumerate() {
            match change {
                Change::Set(a, v) if *a == attribute => {
                    value = v.clone();
                    hits[i] += 1;
                }
                Change::Env(var, v) | Change::AddEnv(var, v) if attribute == "env" => {
                    let mut words: Vec<String> =
                        value.split_whitespace().map(str::to_string).collect();
                    let prefix = format!("{var}=");
                    let existing = words.iter().position(|w| w.starts_with(&prefix));
                    match (change, existing) {
                        (Change::Env(..), Some(at)) => words[at] = format!("{var}={v}"),
                        (Change::AddEnv(..), None) => words.push(format!("{var}={v}")),
                        _ => panic!("{service}: env has {existing:?} for {var}"),
                    }
                    value = words.join(" ");
                    hits[i] += 1;
                }
                _ => {}
            }
        }
        out.push(format!("\t{attribute}\t= {value}"));
    }
    assert!(
        hits.iter().all(|&h| h == 1),
        "{service}: changes applied {hits:?} times"
    );
    out.join("\n") + "\n"
}

/// Changes every xinetd test makes: port, user, program path, and where xinetd logs.
fn basic_changes<'a>(port: u16, dir: &Path) -> Vec<Change<'a>> {
    vec![
        Change::Set("port", port.to_string()),
        Change::Set("user", RUN_AS.0.into()),
        Change::Set("group", RUN_AS.1.into()),
        Change::Set("server", binary_for_run_as(dir)),
        Change::Set(
            "log_type",
            format!("FILE {}", dir.join("services.log").display()),
        ),
    ]
}

/// The test binary if RUN_AS can run it in place, else a copy it can run.
fn binary_for_run_as(dir: &Path) -> String {
    let bin = Path::new(proxy_bin());
    let reachable = bin.ancestors().skip(1).all(|d| {
        d.metadata()
            .is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    });
    if reachable && bin.metadata().unwrap().permissions().mode() & 0o005 == 0o005 {
        return bin.display().to_string();
    }
    let copy = dir.join("legacy-mail-proxy");
    if !copy.exists() {
        fs::copy(bin, &copy).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    }
    copy.display().to_string()
}

/// A file owned by RUN_AS, mode `mode`: a password file, or the lock directory.
fn owned_by_run_as(path: &Path, mode: u32) {
    let out = Command::new("chown")
        .arg(format!("{}:{}", RUN_AS.0, RUN_AS.1))
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn password_file(dir: &Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, format!("{secret}\n")).unwrap();
    owned_by_run_as(&path, 0o400);
    path.display().to_string()
}

fn lock_dir(dir: &Path) -> String {
    let path = dir.join("locks");
    fs::create_dir(&path).unwrap();
    owned_by_run_as(&path, 0o700);
    path.display().to_string()
}

/// A private `xinetd -dontfork` with an includedir of rewritten service files, like
/// /etc/xinetd.conf and /etc/xinetd.d.
struct Xinetd {
    child: Child,
    dir: PathBuf,
}

impl Xinetd {
    fn start(dir: &Path, files: &[(&str, String)]) -> Xinetd {
        let xinetd = require_client("xinetd");
        let d = dir.join("xinetd.d");
        fs::create_dir(&d).unwrap();
        for (name, content) in files {
            assert!(!name.contains('.'), "xinetd skips {name}");
            fs::write(d.join(name), content).unwrap();
        }
        let conf = dir.join("xinetd.conf");
        fs::write(
            &conf,
            format!("defaults\n{{\n}}\n\nincludedir {}\n", d.display()),
        )
        .unwrap();
        let log = dir.join("xinetd.log");
        let child = Command::new(xinetd)
            .arg("-f")
            .arg(&conf)
            .arg("-pidfile")
            .arg(dir.join("xinetd.pid"))
            .arg("-filelog")
            .arg(&log)
            .arg("-dontfork")
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("xinetd.out")).unwrap())
            .stderr(fs::File::create(dir.join("xinetd.err")).unwrap())
            .spawn()
            .unwrap();
        let x = Xinetd {
            child,
            dir: dir.to_path_buf(),
        };
        wait_until("xinetd started", Duration::from_secs(10), || {
            x.log().contains("Started working")
        });
        let log = x.log();
        let expected = files
            .iter()
            .map(|(_, f)| f.matches("\nservice ").count())
            .sum::<usize>();
        assert!(
            log.contains(&format!("Started working: {expected} available service")),
            "{log}"
        );
        // The shipped files must load without a complaint.
        for complaint in ["ERROR", "WARNING", "Bad", "Unknown", "bad"] {
            assert!(!log.contains(complaint), "{log}");
        }
        x
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("xinetd.log")).unwrap_or_default()
    }

    /// The per-connection log (log_on_success / log_on_failure).
    fn services_log(&self) -> String {
        fs::read_to_string(self.dir.join("services.log")).unwrap_or_default()
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.log(), self.services_log())
    }
}

impl Drop for Xinetd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped pop3 service pointed at the test Dovecot (IMAPS), as RUN_AS.
fn xinetd_pop3(dir: &Path, port: u16) -> String {
    let s = servers();
    let mut changes = basic_changes(port, dir);
    changes.extend([
        Change::Env("LMP_IMAP_HOST", s.host.into()),
        Change::Env("LMP_IMAP_PORT", s.imaps_port.to_string()),
        Change::Env("LMP_LOCK_DIR", lock_dir(dir)),
        Change::AddEnv("LMP_CA_FILE", readable_ca(dir)),
    ]);
    rewrite_service(
        &shipped("xinetd/legacy-mail-proxy-pop3"),
        "legacy-mail-proxy-pop3",
        &changes,
    )
}

fn xinetd_smtp(dir: &Path, port: u16) -> String {
    let s = servers();
    let mut changes = basic_changes(port, dir);
    changes.extend([
        Change::Env("LMP_SMTP_HOST", s.host.into()),
        Change::Env("LMP_SMTP_PORT", postfix().submissions_port.to_string()),
        Change::AddEnv("LMP_CA_FILE", readable_ca(dir)),
    ]);
    rewrite_service(
        &shipped("xinetd/legacy-mail-proxy-smtp"),
        "legacy-mail-proxy-smtp",
        &changes,
    )
}

/// A copy of the harness CA that RUN_AS can read.
fn readable_ca(dir: &Path) -> String {
    let path = dir.join("ca.pem");
    if !path.exists() {
        fs::copy(&servers().ca_file, &path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    }
    path.display().to_string()
}

/// Python POP3 and SMTP clients that can pick their source address (127.0.0.x), so that
/// tests can tell per_source from instances.
const CLIENTS: &str = r#"
import json, os, poplib, smtplib, socket, sys

class POP3From(poplib.POP3):
    def __init__(self, port, source):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=60)
    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))

def refused(port, source):
    """True when the server closes a new connection without a byte."""
    s = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
    s.settimeout(10)
    try:
        data = s.recv(100)
    except ConnectionResetError:
        data = b""
    s.close()
    return data == b""
"#;

const SMTPLIB_SEND: &str = r#"
import os, smtplib
n = int(os.environ["T_COUNT"])
sessions = []
for i in range(n):
    s = smtplib.SMTP("127.0.0.1", int(os.environ["T_PORT"]), timeout=60,
                     source_address=(os.environ["T_SOURCE"], 0))
    s.ehlo("client.test")
    s.login(os.environ["T_USER"], os.environ["T_PASS"])
    sessions.append(s)
for i, s in enumerate(sessions):
    msg = "From: %s\r\nTo: %s\r\nSubject: smtplib %d\r\n\r\nbody %d\r\n" % (
        os.environ["T_FROM"], os.environ["T_TO"], i, i)
    s.sendmail(os.environ["T_FROM"], [os.environ["T_TO"]], msg.encode())
    s.quit()
print("sent", n)
"#;

fn seeded_users(prefix: &str, n: usize) -> Vec<User> {
    let s = servers();
    (0..n)
        .map(|i| {
            let user = s.new_user(prefix);
            user.seed_many(&[format!("Subject: {prefix} {i}\r\n\r\nbody {i}\r\n").as_bytes()]);
            user
        })
        .collect()
}

#[test]
fn xinetd_pop3_serves_poplib_and_curl() {
    let dir = scratch("xinetd-pop3", true);
    let port = free_port();
    let xinetd = Xinetd::start(&dir, &[("legacy-mail-proxy-pop3", xinetd_pop3(&dir, port))]);
    let users = seeded_users("xinetd-pop3", 2);

    let out = python(
        &format!(
            "{CLIENTS}\np = POP3From({port}, '127.0.0.1')\np.user(os.environ['T_USER'])\n\
             p.pass_(os.environ['T_PASS'])\nprint(p.stat())\nprint(b'\\n'.join(p.retr(1)[1]).decode())\np.quit()\n"
        ),
        &[("T_USER", &users[0].name), ("T_PASS", &users[0].password)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", text(&out), xinetd.logs());
    assert!(
        stdout.contains("Subject: xinetd-pop3 0\n\nbody 0"),
        "{stdout}"
    );

    let curl = Command::new(require_client("curl"))
        .args(["-sS", "--max-time", "30"])
        .arg(format!("pop3://127.0.0.1:{port}/1"))
        .arg("--user")
        .arg(format!("{}:{}", users[1].name, users[1].password))
        .output()
        .unwrap();
    assert!(curl.status.success(), "{}\n{}", text(&curl), xinetd.logs());
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "Subject: xinetd-pop3 1\r\n\r\nbody 1\r\n"
    );
    wait_until(
        "xinetd logs both sessions' ends",
        Duration::from_secs(10),
        || {
            xinetd
                .services_log()
                .matches("EXIT: legacy-mail-proxy-pop3")
                .count()
                >= 2
        },
    );
    let log = xinetd.services_log();
    assert!(
        log.contains("EXIT: legacy-mail-proxy-pop3 status=0"),
        "{log}"
    );
}

#[test]
fn xinetd_pop3_runs_twenty_sessions_at_once_and_refuses_the_next() {
    let dir = scratch("xinetd-pop3-limits", true);
    let port = free_port();
    let file = xinetd_pop3(&dir, port);
    // The shipped limits: this test is about them, so it reads them rather than assume.
    assert!(file.contains("\tinstances\t= 20\n"), "{file}");
    assert!(file.contains("\tper_source\t= 10\n"), "{file}");
    let xinetd = Xinetd::start(&dir, &[("legacy-mail-proxy-pop3", file)]);
    let users = seeded_users("xinetd-twenty", 20);
    let accounts: Vec<(String, String)> = users
        .iter()
        .map(|u| (u.name.clone(), u.password.clone()))
        .collect();
    let script = format!(
        "{CLIENTS}
port = {port}
sessions = []
for i, (user, password) in enumerate(json.loads(os.environ['T_USERS'])):
    # Ten from each of two addresses: per_source (10) allows it, instances (20) is full.
    p = POP3From(port, '127.0.0.11' if i < 10 else '127.0.0.12')
    p.user(user)
    p.pass_(password)
    sessions.append(p)
print('logged in', len(sessions))
print('21st refused', refused(port, '127.0.0.13'))
print('stats', sorted(set(p.stat()[0] for p in sessions)))
for p in sessions:
    p.quit()
"
    );
    let out = python(&script, &[("T_USERS", &serde_like_json(&accounts))]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", text(&out), xinetd.logs());
    assert!(stdout.contains("logged in 20\n"), "{stdout}");
    assert!(stdout.contains("21st refused True\n"), "{stdout}");
    assert!(stdout.contains("stats [1]\n"), "{stdout}");
    let log = xinetd.services_log();
    assert!(
        log.contains("FAIL: legacy-mail-proxy-pop3 service_limit from=127.0.0.13"),
        "{log}"
    );

    // Once they are gone, one address alone gets ten, not eleven.
    wait_until("xinetd reaps all twenty", Duration::from_secs(30), || {
        xinetd
            .services_log()
            .matches("EXIT: legacy-mail-proxy-pop3")
            .count()
            >= 20
    });
    let out = python(
        &format!(
            "{CLIENTS}
port = {port}
held = [POP3From(port, '127.0.0.14') for _ in range(10)]
print('11th refused', refused(port, '127.0.0.14'))
print('other address served', not refused(port, '127.0.0.15'))
"
        ),
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", text(&out), xinetd.logs());
    assert!(stdout.contains("11th refused True\n"), "{stdout}");
    assert!(stdout.contains("other address served True\n"), "{stdout}");
    let log = xinetd.services_log();
    assert!(
        log.contains("FAIL: legacy-mail-proxy-pop3 per_source_limit from=127.0.0.14"),
        "{log}"
    );
}

/// `[["user","password"],…]` without a JSON crate: names and passwords here are
/// alphanumeric with '-'.
fn serde_like_json(pairs: &[(String, String)]) -> String {
    let items: Vec<String> = pairs
        .iter()
        .map(|(a, b)| {
            assert!(
                (a.clone() + b)
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            );
            format!("[\"{a}\",\"{b}\"]")
        })
        .collect();
    format!("[{}]", items.join(","))
}

#[test]
fn xinetd_smtp_serves_swaks_and_smtplib_twenty_at_once() {
    let dir = scratch("xinetd-smtp", true);
    let port = free_port();
    let xinetd = Xinetd::start(&dir, &[("legacy-mail-proxy-smtp", xinetd_smtp(&dir, port))]);
    let s = servers();
    let user = s.new_user("xinetd-smtp");

    let swaks = Command::new(require_client("swaks"))
        .args(["--server", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--ehlo",
            "client.test",
            "--from",
            &user.email,
            "--to",
            &user.email,
        ])
        .args(["--auth", "PLAIN", "--auth-user", &user.name])
        .args(["--auth-password", &user.password])
        .args(["--header", "Subject: via swaks", "--body", "swaks body"])
        .output()
        .unwrap();
    assert!(
        swaks.status.success(),
        "{}\n{}",
        text(&swaks),
        xinetd.logs()
    );
    assert!(
        text(&swaks).contains("<-  250 2.0.0 Ok: "),
        "{}",
        text(&swaks)
    );
    wait_for_messages(&user, 1);

    // Twenty sessions open and logged in at the same time (ten per address), then each
    // sends one message; the 21st connection is refused while they are open.
    let script = format!(
        "{CLIENTS}
port = {port}
sessions = []
for i in range(20):
    c = smtplib.SMTP('127.0.0.1', port, timeout=60,
                     source_address=('127.0.0.21' if i < 10 else '127.0.0.22', 0))
    c.ehlo('client.test')
    c.login(os.environ['T_USER'], os.environ['T_PASS'])
    sessions.append(c)
print('21st refused', refused(port, '127.0.0.23'))
for i, c in enumerate(sessions):
    c.sendmail(os.environ['T_ADDR'], [os.environ['T_ADDR']],
               ('Subject: concurrent %d\\r\\n\\r\\nbody %d\\r\\n' % (i, i)).encode())
    c.quit()
print('sent', len(sessions))
"
    );
    let out = python(
        &script,
        &[
            ("T_USER", &user.name),
            ("T_PASS", &user.password),
            ("T_ADDR", &user.email),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", text(&out), xinetd.logs());
    assert!(stdout.contains("21st refused True\nsent 20\n"), "{stdout}");
    wait_for_messages(&user, 21);
    let stored = imap_fetch_all(&user);
    for i in 0..20 {
        let subject = format!("Subject: concurrent {i}\r\n");
        assert!(
            stored
                .iter()
                .any(|(_, m)| String::from_utf8_lossy(m).contains(&subject)),
            "{subject} missing"
        );
    }
    assert!(
        xinetd
            .services_log()
            .contains("FAIL: legacy-mail-proxy-smtp service_limit from=127.0.0.23")
    );
}

/// imaplib through a plain port: logs in, and returns the first message's text.
fn imaplib_fetch(port: u16, user: &User, logs: &dyn Fn() -> String) -> String {
    let out = python(
        r#"
import imaplib, os
m = imaplib.IMAP4("127.0.0.1", int(os.environ["T_PORT"]))
m.login(os.environ["T_USER"], os.environ["T_PASS"])
m.select("INBOX", readonly=True)
typ, data = m.fetch("1", "(BODY.PEEK[TEXT])")
print(data[0][1].decode())
m.logout()
"#,
        &[
            ("T_PORT", &port.to_string()),
            ("T_USER", &user.name),
            ("T_PASS", &user.password),
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), logs());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn xinetd_tunnel_joins_imaplib_to_imaps() {
    let s = servers();
    let dir = scratch("xinetd-tunnel", true);
    let port = free_port();
    let mut changes = basic_changes(port, &dir);
    changes.extend([
        Change::Env("LMP_CONNECT", format!("{}:{}", s.host, s.imaps_port)),
        Change::AddEnv("LMP_CA_FILE", readable_ca(&dir)),
    ]);
    let file = rewrite_service(
        &shipped("xinetd/legacy-mail-proxy-tunnel"),
        "legacy-mail-proxy-tunnel",
        &changes,
    );
    let xinetd = Xinetd::start(&dir, &[("legacy-mail-proxy-tunnel", file)]);
    let user = s.new_user("xinetd-tunnel");
    user.seed_many(&[b"Subject: t\r\n\r\nthrough xinetd\r\n"]);
    let got = imaplib_fetch(port, &user, &|| xinetd.logs());
    assert!(got.contains("through xinetd"), "{got}");
}

#[test]
fn xinetd_example_runs_several_backends_side_by_side() {
    let s = servers();
    let p = postfix();
    let dir = scratch("xinetd-several", true);
    let example = shipped("xinetd/examples/legacy-mail-proxy-several-backends");
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let personal = s.new_user("personal");
    personal.seed_many(&[b"Subject: p\r\n\r\npersonal mail\r\n"]);
    let work = s.new_user("work");
    work.seed_many(&[b"Subject: w\r\n\r\nwork mail\r\n"]);
    let ca = readable_ca(&dir);
    let locks = lock_dir(&dir);

    // Each service gets the basic changes plus its own server, account and paths.
    let services: [(&str, Vec<Change>); 4] = [
        (
            "legacy-mail-proxy-pop3-personal",
            vec![
                Change::Env("LMP_IMAP_HOST", s.host.into()),
                Change::Env("LMP_IMAP_PORT", s.imaps_port.to_string()),
                Change::Env("LMP_LOCK_DIR", locks.clone()),
            ],
        ),
        (
            "legacy-mail-proxy-pop3-work",
            vec![
                Change::Env("LMP_IMAP_HOST", s.host.into()),
                Change::Env("LMP_IMAP_PORT", s.imap_port.to_string()),
                Change::Env("LMP_IMAP_USER", work.name.clone()),
                Change::Env(
                    "LMP_IMAP_PASSWORD_FILE",
                    password_file(&dir, "work-imap-password", &work.password),
                ),
                Change::Env(
                    "LMP_CLIENT_PASSWORD_FILE",
                    password_file(&dir, "work-client-password", "legacy secret"),
                ),
                Change::Env("LMP_LOCK_DIR", locks.clone()),
            ],
        ),
        (
            "legacy-mail-proxy-smtp-work",
            vec![
                Change::Env("LMP_SMTP_HOST", s.host.into()),
                Change::Env("LMP_SMTP_PORT", p.submission_port.to_string()),
            ],
        ),
        (
            "legacy-mail-proxy-tunnel-imap-personal",
            vec![Change::Env(
                "LMP_CONNECT",
                format!("{}:{}", s.host, s.imaps_port),
            )],
        ),
    ];
    let mut file = example;
    for ((service, extra), port) in services.into_iter().zip(&ports) {
        let mut changes = basic_changes(*port, &dir);
        changes.extend(extra);
        changes.push(Change::AddEnv("LMP_CA_FILE", ca.clone()));
        file = rewrite_service(&file, service, &changes);
    }
    let xinetd = Xinetd::start(&dir, &[("legacy-mail-proxy-several-backends", file)]);

    let pop3 = |port: u16, user: &str, password: &str| {
        transcript(
            port,
            &[
                ("", "+OK"),
                (&format!("USER {user}\r\n"), "+OK"),
                (&format!("PASS {password}\r\n"), "+OK"),
                ("RETR 1\r\n", ".\r\n"),
                ("QUIT\r\n", "+OK"),
            ],
        )
    };
    let got = pop3(ports[0], &personal.name, &personal.password);
    assert!(got.contains("personal mail"), "{got}\n{}", xinetd.logs());
    // The work gateway logs in with its own account; the client gives the local password.
    let got = pop3(ports[1], "alice-work", "legacy secret");
    assert!(got.contains("work mail"), "{got}\n{}", xinetd.logs());

    let out = python(
        SMTPLIB_SEND,
        &[
            ("T_PORT", &ports[2].to_string()),
            ("T_SOURCE", "127.0.0.1"),
            ("T_USER", &work.name),
            ("T_PASS", &work.password),
            ("T_FROM", &work.email),
            ("T_TO", &work.email),
            ("T_COUNT", "1"),
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), xinetd.logs());
    wait_for_messages(&work, 2);

    let got = imaplib_fetch(ports[3], &personal, &|| xinetd.logs());
    assert!(got.contains("personal mail"), "{got}");
}

#[test]
fn xinetd_files_keep_secrets_out_and_log_failures() {
    for name in [
        "xinetd/legacy-mail-proxy-pop3",
        "xinetd/legacy-mail-proxy-smtp",
        "xinetd/legacy-mail-proxy-tunnel",
        "xinetd/examples/legacy-mail-proxy-several-backends",
    ] {
        let file = shipped(name);
        assert!(file.starts_with("# "), "{name}: a header comment");
        for service in file.split("\nservice ").skip(1) {
            let attr = |a: &str| {
                service
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.trim().split_once('=')?;
                        (k.trim() == a).then(|| v.trim().to_string())
                    })
                    .unwrap_or_else(|| panic!("{name}: no {a}"))
            };
            assert_eq!(attr("bind"), "127.0.0.1", "{name}");
            assert_eq!(attr("user"), "legacy-mail-proxy", "{name}");
            assert_eq!(attr("log_on_failure"), "HOST ATTEMPT", "{name}");
            assert_eq!(attr("passenv"), "", "{name}: only the listed environment");
            for limit in ["instances", "per_source"] {
                let n: u32 = attr(limit).parse().unwrap();
                assert!((1..=100).contains(&n), "{name} {limit}");
            }
            assert!(!attr("cps").is_empty());
            let env = attr("env");
            // stderr is the client's socket under xinetd.
            assert!(env.contains("LMP_LOG=syslog"), "{name}");
            for word in env.split_whitespace() {
                let var = word.split('=').next().unwrap();
                assert!(
                    !var.contains("PASSWORD") || var.ends_with("_PASSWORD_FILE"),
                    "{name}: {word}"
                );
            }
        }
    }
}
