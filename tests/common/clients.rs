//! Independent reference clients: Python's imaplib and poplib (run as subprocesses) read
//! what Dovecot really holds, so tests never check the proxy with the proxy's own code.
//! Also: checks that client programs exist, and a polling helper.

use std::env;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use super::postfix::postfix_if_started;
use super::{INSTALL_HINT, User, servers};

/// The Python side: `python3 clients.py COMMAND`, account in LMP_USER / LMP_PASS.
/// Logins use AUTHENTICATE PLAIN, because imaplib's login() cannot send non-ASCII.
pub const CLIENTS_PY: &str = r#"
import imaplib, os, poplib, re, sys

HOST = os.environ.get("LMP_HOST", "127.0.0.1")
USER = os.environ["LMP_USER"]
PASS = os.environ["LMP_PASS"]
MAILBOX = os.environ.get("LMP_MAILBOX", "INBOX")
out = sys.stdout.buffer
imaplib._MAXLINE = 1 << 26
poplib._MAXLINE = 1 << 26


def imap():
    m = imaplib.IMAP4(HOST, int(os.environ["LMP_IMAP_PORT"]))
    m.authenticate("PLAIN", lambda _: ("\0%s\0%s" % (USER, PASS)).encode("utf-8"))
    return m


def ok(res):
    typ, data = res
    if typ != "OK":
        sys.exit("IMAP command failed: %r %r" % (typ, data))
    return data


def quote(name):
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fetch_all():
    m = imap()
    ok(m.select(quote(MAILBOX), readonly=True))
    pending = None
    for item in ok(m.uid("FETCH", "1:*", "(UID BODY.PEEK[])")):
        if isinstance(item, tuple):
            uid = re.search(rb"UID (\d+)", item[0])
            if uid:
                out.write(b"%d %d\n" % (int(uid.group(1)), len(item[1])) + item[1])
            else:
                pending = item[1]
        elif item is not None and pending is not None:
            uid = re.search(rb"UID (\d+)", item)
            if not uid:
                sys.exit("no UID in FETCH response %r" % item)
            out.write(b"%d %d\n" % (int(uid.group(1)), len(pending)) + pending)
            pending = None
    m.logout()


def flags():
    m = imap()
    ok(m.select(quote(MAILBOX), readonly=True))
    for item in ok(m.uid("FETCH", "1:*", "(UID FLAGS)")):
        if item is None:
            continue
        uid = re.search(rb"UID (\d+)", item)
        fl = re.search(rb"FLAGS \(([^)]*)\)", item)
        if uid and fl:
            out.write(uid.group(1) + b"\t" + fl.group(1) + b"\n")
    m.logout()


def mailboxes():
    m = imap()
    for item in ok(m.list('""', "*")):
        if isinstance(item, tuple):
            name = item[1]
        else:
            g = re.match(rb'\(([^)]*)\) (NIL|"(?:\\.|[^"\\])*") (.*)$', item)
            if not g:
                sys.exit("cannot parse LIST response %r" % item)
            name = g.group(3)
            if name.startswith(b'"'):
                name = re.sub(rb"\\(.)", rb"\1", name[1:-1])
        out.write(name + b"\n")
    m.logout()


def pop3():
    p = poplib.POP3(HOST, int(os.environ["LMP_POP3_PORT"]))
    p.user(USER)
    p.pass_(PASS)
    return p


def pop3_uidl():
    p = pop3()
    for line in p.uidl()[1]:
        out.write(line + b"\n")
    p.quit()


def pop3_list():
    p = pop3()
    for line in p.list()[1]:
        out.write(line + b"\n")
    p.quit()


def append():
    # Every file of LMP_APPEND_DIR, in name order, appended to MAILBOX as sent.
    m = imap()
    folder = os.environ["LMP_APPEND_DIR"]
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            ok(m.append(quote(MAILBOX), None, None, f.read()))
    m.logout()


{"fetch_all": fetch_all, "flags": flags, "mailboxes": mailboxes, "append": append,
 "pop3_uidl": pop3_uidl, "pop3_list": pop3_list}[sys.argv[1]]()
"#;

/// The proxy binary built by Cargo for this test run.
pub fn proxy_bin() -> &'static str {
    env!("CARGO_BIN_EXE_legacy-mail-proxy")
}

/// Runs one proxy process with `input` on stdin (written from a thread, so a proxy that
/// answers before reading it all cannot block the test) and waits for it to end.
pub fn run_proxy(args: &[String], envs: &[(&str, &str)], input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(proxy_bin())
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn proxy");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    super::keep_proxy_log(&out.stderr);
    out
}

/// Environment for Python snippets: LMP_HOST, LMP_TLS_HOST (localhost), LMP_IMAP_PORT,
/// LMP_IMAPS_PORT, LMP_POP3_PORT, LMP_CA_FILE, LMP_UNTRUSTED_CA_FILE, LMP_UNTRUSTED_HOST,
/// LMP_UNTRUSTED_IMAP_PORT, LMP_UNTRUSTED_IMAPS_PORT, and, once Postfix runs,
/// LMP_SUBMISSIONS_PORT, LMP_SUBMISSION_PORT, LMP_UNTRUSTED_SUBMISSIONS_PORT,
/// LMP_UNTRUSTED_SUBMISSION_PORT.
pub fn server_env() -> Vec<(String, String)> {
    let s = servers();
    let mut env = vec![
        ("LMP_HOST", s.host.to_string()),
        ("LMP_TLS_HOST", s.tls_host.to_string()),
        ("LMP_IMAP_PORT", s.imap_port.to_string()),
        ("LMP_IMAPS_PORT", s.imaps_port.to_string()),
        ("LMP_POP3_PORT", s.pop3_port.to_string()),
        ("LMP_CA_FILE", s.ca_file.display().to_string()),
        (
            "LMP_UNTRUSTED_CA_FILE",
            s.untrusted_ca_file.display().to_string(),
        ),
        ("LMP_UNTRUSTED_HOST", s.untrusted_host.to_string()),
        ("LMP_UNTRUSTED_IMAP_PORT", s.untrusted_imap_port.to_string()),
        (
            "LMP_UNTRUSTED_IMAPS_PORT",
            s.untrusted_imaps_port.to_string(),
        ),
    ];
    if let Some(p) = postfix_if_started() {
        env.extend([
            ("LMP_SUBMISSIONS_PORT", p.submissions_port.to_string()),
            ("LMP_SUBMISSION_PORT", p.submission_port.to_string()),
            (
                "LMP_UNTRUSTED_SUBMISSIONS_PORT",
                p.untrusted_submissions_port.to_string(),
            ),
            (
                "LMP_UNTRUSTED_SUBMISSION_PORT",
                p.untrusted_submission_port.to_string(),
            ),
        ]);
    }
    env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Runs `python3 -c SNIPPET` with [`server_env`] plus `env`. Returns the raw output.
pub fn python(snippet: &str, env: &[(&str, &str)]) -> Output {
    let python = require_client("python3");
    Command::new(python)
        .arg("-c")
        .arg(snippet)
        .envs(server_env())
        .envs(env.iter().copied())
        .env("PYTHONIOENCODING", "utf-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"))
}

/// Like [`python`], but panics (showing stderr) unless the snippet exits 0; returns stdout.
pub fn python_ok(snippet: &str, env: &[(&str, &str)]) -> Vec<u8> {
    let out = python(snippet, env);
    assert!(
        out.status.success(),
        "python snippet failed ({}):\n{snippet}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// IMAP APPENDs `messages`, in order and as they are, to `user`'s INBOX on the IMAP server
/// on 127.0.0.1:`port` (seeds servers whose store the harness does not write directly).
pub fn imap_append_at(user: &User, port: u16, messages: &[Vec<u8>]) {
    let dir = servers().dir.join("append").join(&user.name);
    std::fs::create_dir_all(&dir).expect("mkdir append dir");
    for (i, m) in messages.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:06}")), m).expect("write message to append");
    }
    run_clients_py(
        user,
        "append",
        &[
            ("LMP_APPEND_DIR", dir.to_str().unwrap()),
            ("LMP_IMAP_PORT", &port.to_string()),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_clients_py(user: &User, command: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let s = servers();
    let python = require_client("python3");
    let out = Command::new(python)
        .arg(s.dir.join("clients.py"))
        .arg(command)
        .envs(server_env())
        .env("LMP_USER", &user.name)
        .env("LMP_PASS", &user.password)
        .envs(extra.iter().copied())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(
        out.status.success(),
        "reference client `{command}` for {} failed ({}):\n{}\n{}",
        user.name,
        out.status,
        String::from_utf8_lossy(&out.stderr),
        s.dovecot_logs()
    );
    out.stdout
}

/// Every message of INBOX as (UID, bytes) via IMAP `UID FETCH 1:* BODY.PEEK[]` on the
/// plain port from 127.0.0.1 (read-only: flags are not changed).
pub fn imap_fetch_all(user: &User) -> Vec<(u32, Vec<u8>)> {
    imap_fetch_all_in(user, "INBOX")
}

/// Like [`imap_fetch_all`] for another mailbox.
pub fn imap_fetch_all_in(user: &User, mailbox: &str) -> Vec<(u32, Vec<u8>)> {
    imap_fetch_all_at(user, servers().imap_port, mailbox)
}

/// Like [`imap_fetch_all_in`] from the IMAP server on 127.0.0.1:`port` (another server of
/// the matrix: Cyrus).
pub fn imap_fetch_all_at(user: &User, port: u16, mailbox: &str) -> Vec<(u32, Vec<u8>)> {
    let port = port.to_string();
    let raw = run_clients_py(
        user,
        "fetch_all",
        &[("LMP_MAILBOX", mailbox), ("LMP_IMAP_PORT", &port)],
    );
    let mut rest = &raw[..];
    let mut messages = Vec::new();
    while !rest.is_empty() {
        let nl = rest.iter().position(|&b| b == b'\n').expect("header line");
        let header = std::str::from_utf8(&rest[..nl]).unwrap();
        let (uid, len) = header.split_once(' ').expect("uid len");
        let (uid, len): (u32, usize) = (uid.parse().unwrap(), len.parse().unwrap());
        let body = rest[nl + 1..nl + 1 + len].to_vec();
        rest = &rest[nl + 1 + len..];
        messages.push((uid, body));
    }
    messages
}

/// (UID, flags) of every INBOX message, e.g. `["\\Seen"]`. `\Recent` is left out.
pub fn imap_flags(user: &User) -> Vec<(u32, Vec<String>)> {
    imap_flags_at(user, servers().imap_port)
}

/// Like [`imap_flags`] on the IMAP server on 127.0.0.1:`port`.
pub fn imap_flags_at(user: &User, port: u16) -> Vec<(u32, Vec<String>)> {
    let raw = run_clients_py(user, "flags", &[("LMP_IMAP_PORT", &port.to_string())]);
    String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(|l| {
            let (uid, flags) = l.split_once('\t').unwrap();
            let flags = flags
                .split_whitespace()
                .filter(|f| *f != "\\Recent")
                .map(str::to_string)
                .collect();
            (uid.parse().unwrap(), flags)
        })
        .collect()
}

/// Names of all mailboxes (IMAP LIST "" "*"), as sent (modified UTF-7), e.g. `["INBOX"]`.
pub fn imap_mailbox_list(user: &User) -> Vec<String> {
    let raw = run_clients_py(user, "mailboxes", &[]);
    String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// UIDL strings from Dovecot's own POP3 server, in message-number order: the reference
/// the proxy's UIDLs are compared with (`pop3_uidl_format = %08Xu%08Xv`).
pub fn dovecot_pop3_uidl(user: &User) -> Vec<String> {
    let raw = run_clients_py(user, "pop3_uidl", &[]);
    pop3_listing(&raw)
}

/// Message sizes (octets, as in POP3 LIST) from Dovecot's own POP3, in message order.
pub fn dovecot_pop3_list(user: &User) -> Vec<u64> {
    let raw = run_clients_py(user, "pop3_list", &[]);
    pop3_listing(&raw)
        .into_iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn pop3_listing(raw: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(raw)
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let (n, value) = l.split_once(' ').unwrap();
            assert_eq!(n, (i + 1).to_string(), "POP3 listing out of order: {l}");
            value.to_string()
        })
        .collect()
}

/// Debian packages that provide each client program.
fn package_for(program: &str) -> &'static str {
    match program {
        "swaks" => "swaks libnet-ssleay-perl libio-socket-ssl-perl",
        "python3" => "python3",
        "curl" => "curl",
        "fetchmail" => "fetchmail",
        "openssl" => "openssl",
        "xinetd" => "xinetd",
        "dovecot" | "doveadm" | "doveconf" => "dovecot-imapd dovecot-pop3d dovecot-lmtpd",
        "postfix" | "postconf" => "postfix",
        "systemd-socket-activate" => "systemd",
        _ => "",
    }
}

/// The absolute path of a program, searching PATH and the sbin directories.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let extra = OsStr::new("/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin");
    env::split_paths(&path)
        .chain(env::split_paths(extra))
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The message for a missing program: exactly what to install.
pub fn missing_program_message(program: &str) -> String {
    let pkg = package_for(program);
    let pkg = if pkg.is_empty() { program } else { pkg };
    format!(
        "`{program}` is not installed. Install it with:\n  \
         apt-get install -y --no-install-recommends {pkg}\n{INSTALL_HINT}"
    )
}

/// Panics with the install command unless `program` (curl, fetchmail, swaks, python3, …)
/// is installed; returns its path. For swaks it also checks the Perl TLS modules.
pub fn require_client(program: &str) -> PathBuf {
    let Some(path) = which(program) else {
        panic!("{}", missing_program_message(program));
    };
    if program == "swaks" {
        let ok = Command::new("perl")
            .args(["-MNet::SSLeay", "-MIO::Socket::SSL", "-e1"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "swaks needs Perl TLS support. Install it with:\n  \
             apt-get install -y --no-install-recommends libnet-ssleay-perl libio-socket-ssl-perl\n\
             {INSTALL_HINT}"
        );
    }
    path
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until INBOX of `user` holds at least `n` message files (e.g. after an SMTP
/// submission, which Postfix delivers asynchronously), at most 30 s.
pub fn wait_for_messages(user: &User, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while user.maildir_count() < n {
        if Instant::now() > deadline {
            let pf = postfix_if_started().map(|p| p.logs()).unwrap_or_default();
            panic!(
                "{} has {} messages, expected {n}\n{pf}\n{}",
                user.name,
                user.maildir_count(),
                servers().dovecot_logs()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs fetchmail once in the foreground on the control file `rc` (written 0600 here,
/// as fetchmail insists), with `dir` as its HOME and `extra` arguments, and returns what
/// it did. It gets a lock file of its own: as root fetchmail locks the machine-wide
/// /var/run/fetchmail.pid whatever HOME says, and a second fetchmail running at the same
/// time (another test, another suite) would refuse to start ("another foreground
/// fetchmail is running", seen here).
pub fn run_fetchmail(rc: &std::path::Path, dir: &std::path::Path, extra: &[&str]) -> Output {
    use std::os::unix::fs::PermissionsExt;
    let fetchmail = require_client("fetchmail");
    std::fs::set_permissions(rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    Command::new(fetchmail)
        .arg("-f")
        .arg(rc)
        .args(["--nodetach", "--all", "--pidfile"])
        .arg(dir.join("fetchmail.pid"))
        .args(extra)
        .env("HOME", dir)
        .output()
        .expect("run fetchmail")
}
