//! The Debian package under a real systemd 252: each test boots a throwaway Debian 12
//! container (`systemd-nspawn --boot`, systemd as its PID 1) from the cached root file
//! system of `tests/container/rootfs`, installs the `.deb` that `packaging/build-deb`
//! builds, and drives the installed units with Python's poplib/smtplib from inside the
//! container, against the test Dovecot and Postfix.
//!
//! The container shares the host's network namespace (no `--private-network`), so that its
//! loopback reaches the harness's servers; every socket is therefore moved to a free port
//! with a drop-in before it is enabled, as the README tells admins to move them. Everything
//! else the container writes lands in a tmpfs above the cached tree (`--volatile=overlay`).
//!
//! nspawn with `--keep-unit` puts its `payload`/`supervisor` cgroups below the caller's
//! cgroup and leaves them behind: each container is started inside a cgroup of its own
//! (`lmp-nspawn-…`), removed after shutdown, so that containers never share one.
//!
//! These tests fail (never skip) when systemd-nspawn or mmdebstrap are missing.

mod common;
mod deb;

use common::{User, postfix, servers, wait_for_messages, wait_until, which};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const ETC: &str = "/etc/legacy-mail-proxy";
const SOCKETS: [&str; 3] = [
    "legacy-mail-proxy-pop3.socket",
    "legacy-mail-proxy-smtp.socket",
    "legacy-mail-proxy-tunnel.socket",
];

/// A booted container; powered off and cleaned up on drop.
struct Container {
    nspawn: Child,
    /// PID 1 of the container (systemd), as the host sees it.
    pid1: u32,
    cgroup: String,
    log: PathBuf,
    /// The package as the container sees it (bound read-only).
    deb: String,
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Container {
    fn boot() -> Container {
        static N: AtomicU64 = AtomicU64::new(0);
        for tool in ["systemd-nspawn", "mmdebstrap", "nsenter"] {
            assert!(
                which(tool).is_some(),
                "{tool} is missing: apt-get install -y --no-install-recommends \
                 systemd-container mmdebstrap (tests/setup.sh installs them)"
            );
        }
        let rootfs = rootfs();
        let deb = deb::package("systemd");
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("lmp-{}-{n}", std::process::id());
        let cgroup = format!("lmp-nspawn-{}-{n}", std::process::id());
        for hierarchy in cgroup_hierarchies() {
            fs::create_dir(Path::new(hierarchy).join(&cgroup)).unwrap();
        }
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let log_file = fs::File::create(&log).unwrap();
        let join_cgroup: String = cgroup_hierarchies()
            .iter()
            .map(|h| format!("echo $$ > {h}/{cgroup}/cgroup.procs && "))
            .collect();
        let nspawn = Command::new("sh")
            .arg("-c")
            .arg(format!("{join_cgroup}exec systemd-nspawn \"$@\""))
            .arg("sh")
            .args([
                "-D",
                rootfs,
                "--volatile=overlay",
                "--boot",
                "--register=no",
            ])
            // Without --keep-unit: "Failed to open system bus" (no host systemd).
            .args(["--keep-unit", "--console=pipe", "-M", &name])
            .arg(format!(
                "--bind-ro={}:/mnt/pkg",
                deb.parent().unwrap().display()
            ))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .expect("systemd-nspawn did not start");
        let started = Instant::now();
        let mut container = Container {
            pid1: 0,
            nspawn,
            cgroup,
            log,
            deb: format!("/mnt/pkg/{}", deb.file_name().unwrap().to_string_lossy()),
        };
        let nspawn_pid = container.nspawn.id().to_string();
        wait_until("the container's PID 1", Duration::from_secs(20), || {
            let out = Command::new("pgrep")
                .args(["-P", &nspawn_pid, "-x", "systemd"])
                .output()
                .unwrap();
            container.pid1 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            container.pid1 != 0 || container.failed_to_boot()
        });
        assert!(container.pid1 != 0, "nspawn: {}", container.logs());
        wait_until("systemd running", Duration::from_secs(30), || {
            let state = container.sh("systemctl is-system-running");
            let state = String::from_utf8_lossy(&state.stdout);
            matches!(state.trim(), "running" | "degraded")
        });
        eprintln!(
            "container booted in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        container
    }

    fn failed_to_boot(&mut self) -> bool {
        self.nspawn.try_wait().unwrap().is_some()
    }

    fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a shell script inside the container (all its namespaces, as root).
    fn sh(&self, script: &str) -> Output {
        self.sh_with_input(script, b"")
    }

    fn sh_with_input(&self, script: &str, input: &[u8]) -> Output {
        let mut child = Command::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-a", "sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs a script that must succeed; returns its stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container: {script}\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn write(&self, path: &str, mode: &str, contents: &[u8]) {
        let out = self.sh_with_input(&format!("install -D -m {mode} /dev/stdin {path}"), contents);
        assert!(out.status.success(), "write {path}: {}", output_text(&out));
    }

    /// A Python snippet run inside the container; its stdout. Fails the test if it fails.
    fn python(&self, snippet: &str) -> String {
        let out = self.sh_with_input("python3 -", snippet.as_bytes());
        assert!(
            out.status.success(),
            "python in the container failed:\n{snippet}\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A Python snippet started in the container, with pipes: the tests drive a held-open
    /// session through its stdin and read its progress from its stdout.
    fn spawn_python(&self, snippet: &str) -> HeldSession {
        let mut child = Command::new("nsenter")
            .args([
                "-t",
                &self.pid1.to_string(),
                "-a",
                "python3",
                "-u",
                "-c",
                snippet,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        HeldSession { child, stdout }
    }

    /// Sets KEY=value in an env file, where the file has the line (maybe commented out).
    fn set_env(&self, unit: &str, key: &str, value: &str) {
        let file = format!("{ETC}/{unit}.env");
        self.ok(&format!(
            "grep -Eq '^#?{key}=' {file} && sed -i -E '0,/^#?{key}=.*/s||{key}={value}|' {file}"
        ));
    }

    /// Moves a socket to 127.0.0.1:port with a drop-in, as `systemctl edit` would.
    fn listen_on(&self, socket: &str, port: u16) {
        self.write(
            &format!("/etc/systemd/system/{socket}.d/listen.conf"),
            "0644",
            format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n").as_bytes(),
        );
    }

    /// The journal of the gateway's instances: (priority, message) per line.
    fn gateway_journal(&self) -> Vec<(u8, String)> {
        let json = self.ok(
            "journalctl -o json --no-pager SYSLOG_IDENTIFIER=legacy-mail-proxy-pop3 \
             SYSLOG_IDENTIFIER=legacy-mail-proxy-smtp SYSLOG_IDENTIFIER=legacy-mail-proxy-tunnel",
        );
        json.lines()
            .filter_map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                let priority = v["PRIORITY"].as_str()?.parse().ok()?;
                Some((priority, v["MESSAGE"].as_str()?.to_owned()))
            })
            .collect()
    }

    /// The host PID of the gateway instance serving the single open POP3 connection.
    fn instance_host_pid(&self) -> u32 {
        let mut unit = String::new();
        wait_until("a running POP3 instance", Duration::from_secs(10), || {
            unit = self.ok(
                "systemctl list-units --no-legend --state=running 'legacy-mail-proxy-pop3@*' \
                 | awk '{print $1}'",
            );
            !unit.trim().is_empty()
        });
        let pid = self.ok(&format!(
            "systemctl show -p MainPID --value '{}'",
            unit.trim()
        ));
        let inner = pid.trim();
        // NSpid: the host's PID first, the container's last.
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let status = fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            if let Some(nspid) = status.lines().find(|l| l.starts_with("NSpid:"))
                && nspid.split_whitespace().last() == Some(inner)
                && status.contains("legacy-mail-pro")
                && let Ok(host) = entry.file_name().to_string_lossy().parse()
            {
                return host;
            }
        }
        panic!("no host process for container PID {inner}");
    }
}

/// A client session kept open by a Python process in the container.
struct HeldSession {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl HeldSession {
    /// The next line the script prints.
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    }
    /// Tells the script to go on (it reads one line from stdin).
    fn proceed(&mut self) {
        writeln!(self.child.stdin.as_mut().unwrap()).unwrap();
    }
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "client failed: {rest}"
        );
        rest
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.pid1 != 0 {
            let _ = self.sh("systemctl poweroff");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for hierarchy in cgroup_hierarchies() {
            remove_cgroup(&Path::new(hierarchy).join(&self.cgroup));
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// The cgroup hierarchies nspawn creates its groups in (hybrid set-up: both, else v2).
fn cgroup_hierarchies() -> Vec<&'static str> {
    let hybrid = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"];
    if hybrid
        .iter()
        .all(|h| Path::new(h).join("cgroup.procs").exists())
    {
        hybrid.to_vec()
    } else {
        vec!["/sys/fs/cgroup"]
    }
}

fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The cached root file system, built on first use (once per process; the script itself
/// also takes a lock, for other processes).
fn rootfs() -> &'static str {
    static ROOTFS: OnceLock<String> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let started = Instant::now();
        let out = Command::new(deb::repo().join("tests/container/rootfs"))
            .output()
            .expect("tests/container/rootfs did not start");
        assert!(
            out.status.success(),
            "tests/container/rootfs: {}",
            output_text(&out)
        );
        eprintln!(
            "root file system ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    })
}

/// Installs the package and configures the three gateways as the README says: the CA
/// file, the env files, and each socket on a free port. Returns the ports (pop3, smtp,
/// tunnel). Enables nothing.
fn install_and_configure(c: &Container) -> [u16; 3] {
    let started = Instant::now();
    c.ok(&format!("dpkg -i {}", c.deb));
    eprintln!("dpkg -i took {:.2} s", started.elapsed().as_secs_f64());
    let s = servers();
    let ca = fs::read(&s.ca_file).unwrap();
    c.write(&format!("{ETC}/ca.pem"), "0644", &ca);
    c.set_env("legacy-mail-proxy-pop3", "LMP_IMAP_HOST", s.host);
    c.set_env(
        "legacy-mail-proxy-pop3",
        "LMP_IMAP_PORT",
        &s.imaps_port.to_string(),
    );
    c.set_env(
        "legacy-mail-proxy-pop3",
        "LMP_CA_FILE",
        &format!("{ETC}/ca.pem"),
    );
    let p = postfix();
    c.set_env("legacy-mail-proxy-smtp", "LMP_SMTP_HOST", p.host);
    c.set_env(
        "legacy-mail-proxy-smtp",
        "LMP_SMTP_PORT",
        &p.submissions_port.to_string(),
    );
    c.set_env(
        "legacy-mail-proxy-smtp",
        "LMP_CA_FILE",
        &format!("{ETC}/ca.pem"),
    );
    c.set_env(
        "legacy-mail-proxy-tunnel",
        "LMP_CONNECT",
        &format!("{}:{}", s.host, s.pop3_port),
    );
    c.set_env("legacy-mail-proxy-tunnel", "LMP_STARTTLS", "pop3");
    c.set_env(
        "legacy-mail-proxy-tunnel",
        "LMP_CA_FILE",
        &format!("{ETC}/ca.pem"),
    );
    let ports = [free_port(), free_port(), free_port()];
    for (socket, port) in SOCKETS.iter().zip(ports) {
        c.listen_on(socket, port);
    }
    c.ok("systemctl daemon-reload");
    ports
}

fn seeded_user() -> User {
    let user = servers().new_user("sd");
    user.seed(b"From: a@example.test\r\nSubject: via systemd\r\n\r\nhello from the mailbox\r\n");
    user
}

fn poplib_fetch(port: u16, user: &User) -> String {
    format!(
        "import poplib\n\
         p = poplib.POP3('127.0.0.1', {port}, timeout=20)\n\
         p.user({name:?}); p.pass_({pw:?})\n\
         print(p.stat()[0])\n\
         print(b'\\n'.join(p.retr(1)[1]).decode())\n\
         p.quit()\n",
        name = user.name,
        pw = user.password
    )
}

#[test]
fn package_installs_inert_then_serves_pop3_smtp_and_tunnel_and_removes_cleanly() {
    let c = Container::boot();
    let [pop3, smtp, tunnel] = install_and_configure(&c);

    // Install enables and starts nothing; sysusers and tmpfiles did their part.
    for socket in SOCKETS {
        assert_eq!(
            c.sh(&format!("systemctl is-enabled {socket}")).stdout,
            b"disabled\n"
        );
        assert_eq!(
            c.sh(&format!("systemctl is-active {socket}")).stdout,
            b"inactive\n"
        );
    }
    assert!(
        c.ok("getent passwd legacy-mail-proxy")
            .contains(":/nonexistent:")
    );
    assert_eq!(
        c.ok("stat -c '%a %U' /run/lock/legacy-mail-proxy"),
        "700 legacy-mail-proxy\n"
    );

    let sockets = SOCKETS.join(" ");
    c.ok(&format!("systemctl enable --now {sockets}"));

    // The README's gap: a changed ListenStream= needs the socket restarted.
    let moved = free_port();
    c.listen_on(SOCKETS[0], moved);
    c.ok("systemctl daemon-reload");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", moved)).is_err(),
        "the new port listens before the socket is restarted"
    );
    c.ok(&format!("systemctl restart {}", SOCKETS[0]));
    let pop3_moved = moved;
    let _ = pop3;

    let user = seeded_user();
    let fetched = c.python(&poplib_fetch(pop3_moved, &user));
    assert!(fetched.starts_with("1\n"), "{fetched}");
    assert!(fetched.contains("hello from the mailbox"), "{fetched}");

    // SMTP with passthrough AUTH, delivered by Postfix into the same mailbox.
    c.python(&format!(
        "import smtplib\n\
         s = smtplib.SMTP('127.0.0.1', {smtp}, timeout=20)\n\
         s.ehlo('ct'); s.login({name:?}, {pw:?})\n\
         s.sendmail({email:?}, [{email:?}], b'Subject: relayed by systemd\\r\\n\\r\\nrelayed\\r\\n')\n\
         s.quit()\n",
        name = user.name,
        pw = user.password,
        email = user.email
    ));
    wait_for_messages(&user, 2);

    // The tunnel: STARTTLS to Dovecot's POP3, plain text to the client.
    let through = c.python(&format!(
        "import poplib\n\
         p = poplib.POP3('127.0.0.1', {tunnel}, timeout=20)\n\
         print(p.getwelcome().decode())\n\
         p.user({name:?}); p.pass_({pw:?})\n\
         print(p.stat()[0]); p.quit()\n",
        name = user.name,
        pw = user.password
    ));
    assert!(through.ends_with("2\n"), "{through}");

    // A wrong password: an info line, never the password.
    let wrong = "Wr0ng-secret-systemd";
    let refused = c.python(&format!(
        "import poplib\n\
         p = poplib.POP3('127.0.0.1', {pop3_moved}, timeout=30)\n\
         p.user({name:?})\n\
         try:\n    p.pass_({wrong:?}); print('accepted')\n\
         except poplib.error_proto as e:\n    print(e)\n",
        name = user.name
    ));
    assert!(refused.contains("-ERR"), "{refused}");

    let journal = c.gateway_journal();
    let has = |priority: u8, text: &str| {
        journal
            .iter()
            .any(|(p, m)| *p == priority && m.contains(text))
    };
    assert!(has(6, "pop3 connect from"), "{journal:#?}");
    assert!(
        has(6, &format!("user={} logged in", user.name)),
        "{journal:#?}"
    );
    assert!(has(6, "authentication failed"), "{journal:#?}");
    let everything = c.ok("journalctl -o export --no-pager");
    for secret in [user.password.as_str(), wrong] {
        assert!(!everything.contains(secret), "a password is in the journal");
    }

    // Each installed unit's exposure, as `systemd-analyze security` scores it.
    for unit in ["pop3", "smtp", "tunnel"] {
        let report = c.ok(&format!(
            "systemd-analyze security legacy-mail-proxy-{unit}@x.service"
        ));
        let score: f64 = report
            .lines()
            .find_map(|l| {
                l.split(": ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{report}"));
        eprintln!("systemd-analyze security legacy-mail-proxy-{unit}@.service: {score}");
        assert!(score <= 1.5, "{unit}: exposure {score}\n{report}");
    }

    // Upgrade (the same package again): conffile edits kept, enabled sockets running.
    c.ok(&format!("dpkg -i {}", c.deb));
    assert!(
        c.ok(&format!("cat {ETC}/legacy-mail-proxy-pop3.env"))
            .contains("LMP_CA_FILE=/etc")
    );
    for socket in SOCKETS {
        assert_eq!(
            c.sh(&format!("systemctl is-active {socket}")).stdout,
            b"active\n"
        );
    }

    // Remove stops the sockets; purge removes the state, leaves the admin's own files.
    c.ok("dpkg -r legacy-mail-proxy");
    for socket in SOCKETS {
        assert_ne!(
            c.sh(&format!("systemctl is-active {socket}")).stdout,
            b"active\n"
        );
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", smtp)).is_err());
    c.ok("test -d /var/lib/legacy-mail-proxy && test -d /run/lock/legacy-mail-proxy");
    c.ok("dpkg --purge legacy-mail-proxy");
    c.ok("! test -e /var/lib/legacy-mail-proxy && ! test -e /run/lock/legacy-mail-proxy");
    c.ok(&format!(
        "test -f {ETC}/ca.pem && ! test -e {ETC}/legacy-mail-proxy-pop3.env"
    ));
}

/// Python that opens a POP3 connection to `port` (from `source`), prints the greeting,
/// then waits for a line on stdin before each of the given commands, printing each reply,
/// and holds the connection until its stdin ends.
fn held_pop3(port: u16, source: &str, commands: &[&str]) -> String {
    format!(
        "import socket, sys\n\
         s = socket.create_connection(('127.0.0.1', {port}), timeout=20, source_address=({source:?}, 0))\n\
         f = s.makefile('rb')\n\
         print(f.readline().decode().strip() or 'closed')\n\
         for c in {commands:?}:\n\
         \x20   sys.stdin.readline()\n\
         \x20   s.sendall(c.encode() + b'\\r\\n')\n\
         \x20   print(f.readline().decode().strip() or 'closed')\n\
         sys.stdin.readline()\n"
    )
}

#[test]
fn hardening_holds_in_a_running_instance_and_socket_stop_spares_the_session() {
    let c = Container::boot();
    let [pop3, _, _] = install_and_configure(&c);
    c.ok(&format!("systemctl enable --now {}", SOCKETS[0]));
    let mut session = c.spawn_python(&held_pop3(pop3, "127.0.0.1", &["USER probe", "QUIT"]));
    assert!(session.line().starts_with("+OK"));
    let pid = c.instance_host_pid();

    // The kernel's view of the instance: no privileges, no capabilities, seccomp on.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = c.ok("id -u legacy-mail-proxy").trim().to_owned();
    for expected in [
        "NoNewPrivs:\t1".to_owned(),
        "Seccomp:\t2".to_owned(),
        "CapEff:\t0000000000000000".to_owned(),
        "CapBnd:\t0000000000000000".to_owned(),
        format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}"),
    ] {
        assert!(status.contains(&expected), "{expected:?} not in\n{status}");
    }

    // A shell in the instance's namespaces, as its user, sees what the gateway sees.
    c.ok("touch /tmp/container-tmp-file");
    let probe = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-a", "-S", &uid, "-G", &uid, "sh", "-c"])
        .arg(
            "for p in /etc/x /usr/x /var/lib/x /home/x; do touch $p 2>/dev/null && echo wrote $p; done; \
             touch /run/lock/legacy-mail-proxy/probe && echo lock-dir-writable; \
             touch /var/lib/legacy-mail-proxy/oauth2/probe && echo state-dir-writable; \
             test -e /tmp/container-tmp-file && echo shared-tmp; \
             ls /root >/dev/null 2>&1 && echo root-readable; \
             echo pids $(ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '); \
             echo comms $(cat /proc/[0-9]*/comm 2>/dev/null | sort -u | tr '\\n' ' ')",
        )
        .output()
        .unwrap();
    let probe = output_text(&probe);
    assert!(
        !probe.contains("wrote"),
        "wrote outside its paths:\n{probe}"
    );
    assert!(probe.contains("lock-dir-writable"), "{probe}");
    assert!(probe.contains("state-dir-writable"), "{probe}");
    assert!(!probe.contains("shared-tmp"), "{probe}");
    assert!(!probe.contains("root-readable"), "{probe}");
    // ProtectProc=invisible: only its own processes (the gateway and this probe).
    let comms = probe.lines().find(|l| l.starts_with("comms")).unwrap();
    for other in ["systemd", "systemd-journal", "dbus-daemon", "python3"] {
        assert!(
            !comms.split_whitespace().any(|c| c == other),
            "sees {other}: {comms}"
        );
    }
    assert!(comms.contains("legacy-mail-pro"), "{comms}");

    // Stopping the socket closes the listener only: the running session goes on.
    c.ok(&format!("systemctl stop {}", SOCKETS[0]));
    assert!(std::net::TcpStream::connect(("127.0.0.1", pop3)).is_err());
    session.proceed();
    assert!(
        session.line().starts_with("+OK"),
        "USER after the socket stopped"
    );
    session.proceed();
    assert!(
        session.line().starts_with("+OK"),
        "QUIT after the socket stopped"
    );
    session.finish();
    wait_until("the instance to end", Duration::from_secs(10), || {
        c.ok("systemctl list-units --no-legend 'legacy-mail-proxy-pop3@*'")
            .trim()
            .is_empty()
    });
}

#[test]
fn credentials_lock_and_connection_limits_under_systemd() {
    let c = Container::boot();
    let [pop3, _, _] = install_and_configure(&c);
    let user = seeded_user();
    let client_password = "Client-pw-systemd-17";
    c.set_env("legacy-mail-proxy-pop3", "LMP_AUTH", "fixed");
    c.set_env("legacy-mail-proxy-pop3", "LMP_IMAP_USER", &user.name);
    c.set_env("legacy-mail-proxy-pop3", "LMP_CLIENT_USER", "alice");
    c.ok(&format!("systemctl enable --now {}", SOCKETS[0]));
    let login = |password: &str| {
        c.python(&format!(
            "import poplib\n\
             p = poplib.POP3('127.0.0.1', {pop3}, timeout=30)\n\
             p.user('alice')\n\
             try:\n    p.pass_({password:?}); print('stat', p.stat()[0]); p.quit()\n\
             except poplib.error_proto as e:\n    print(e)\n"
        ))
    };

    // No credential files: LoadCredential= with a relative name found nowhere is skipped,
    // the instance starts, and the gateway answers -ERR and logs why (priority err).
    let refused = login(client_password);
    assert!(refused.contains("-ERR"), "{refused}");
    let journal = c.gateway_journal();
    assert!(
        journal
            .iter()
            .any(|(p, m)| *p == 3 && m.contains("configuration error")),
        "{journal:#?}"
    );
    assert!(!c.ok("journalctl --no-pager").contains("243/CREDENTIALS"));

    // An absolute LoadCredential= path that is missing fails the instance instead
    // (status 243/CREDENTIALS): the client gets no greeting at all. The units use
    // relative names for that reason.
    let absolute = "/etc/systemd/system/legacy-mail-proxy-pop3@.service.d/absolute.conf";
    c.write(
        absolute,
        "0644",
        b"[Service]\nLoadCredential=absent:/etc/credstore/absent\n",
    );
    c.ok("systemctl daemon-reload");
    let mut closed = c.spawn_python(&held_pop3(pop3, "127.0.0.1", &[]));
    assert_eq!(closed.line(), "closed");
    closed.finish();
    wait_until(
        "243/CREDENTIALS in the journal",
        Duration::from_secs(10),
        || c.ok("journalctl --no-pager").contains("243/CREDENTIALS"),
    );
    c.ok(&format!("rm {absolute} && systemctl daemon-reload"));

    // The credentials, written as the README says (no TTY needed), then a login.
    c.ok("install -d -m 0700 /etc/credstore");
    c.write(
        "/etc/credstore/legacy-mail-proxy-pop3.imap-password",
        "0600",
        format!("{}\n", user.password).as_bytes(),
    );
    c.write(
        "/etc/credstore/legacy-mail-proxy-pop3.client-password",
        "0600",
        format!("{client_password}\n").as_bytes(),
    );
    assert_eq!(login(client_password).trim(), "stat 1");

    // The mailbox lock across two instances: the second session is refused [IN-USE].
    let pass = format!("PASS {client_password}");
    let commands = ["USER alice", pass.as_str()];
    let mut first = c.spawn_python(&held_pop3(pop3, "127.0.0.1", &commands));
    let mut second = c.spawn_python(&held_pop3(pop3, "127.0.0.1", &commands));
    for session in [&mut first, &mut second] {
        assert!(session.line().starts_with("+OK"));
        session.proceed();
        assert!(session.line().starts_with("+OK"));
    }
    first.proceed();
    assert!(first.line().starts_with("+OK"), "first login");
    second.proceed();
    let refused = second.line();
    assert!(refused.starts_with("-ERR [IN-USE]"), "{refused}");
    first.finish();
    second.finish();

    // MaxConnectionsPerSource=10, MaxConnections=20: over either, systemd closes the
    // new connection before any instance starts.
    let hold = |source: &str| {
        let mut session = c.spawn_python(&held_pop3(pop3, source, &[]));
        let greeting = session.line();
        (session, greeting)
    };
    let mut held = Vec::new();
    for _ in 0..10 {
        let (session, greeting) = hold("127.0.0.1");
        assert!(greeting.starts_with("+OK"), "{greeting}");
        held.push(session);
    }
    let (over, greeting) = hold("127.0.0.1");
    assert_eq!(greeting, "closed", "the 11th from one address");
    over.finish();
    for _ in 0..10 {
        let (session, greeting) = hold("127.0.0.2");
        assert!(greeting.starts_with("+OK"), "{greeting}");
        held.push(session);
    }
    let (over, greeting) = hold("127.0.0.3");
    assert_eq!(greeting, "closed", "the 21st connection");
    over.finish();
    for session in held {
        session.finish();
    }
    let everything = c.ok("journalctl -o export --no-pager");
    for secret in [client_password, user.password.as_str()] {
        assert!(!everything.contains(secret), "a password is in the journal");
    }
    let socket_log = c.ok(&format!("journalctl --no-pager -u {}", SOCKETS[0]));
    assert!(
        socket_log.contains("Too many incoming connections (20)"),
        "{socket_log}"
    );
}
