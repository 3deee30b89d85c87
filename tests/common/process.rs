//! Server processes that cannot outlive the test process, free ports, readiness polling.
//!
//! Rust's test harness has no global teardown, so every server is started through a small
//! bash wrapper whose stdin is a pipe held open by this process (the "lifeline"). When the
//! test process exits, however it exits, the kernel closes the pipe, the wrapper reads EOF
//! and kills the server's whole process group. The server runs under `setsid`, so its
//! process group id equals its pid and contains all of its children (Dovecot's and
//! Postfix's helper processes), and Ctrl-C on the terminal does not hit it directly.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// Runs `"$@"` in its own session, writes its pid to `$1`, and kills its process group
/// when stdin reaches EOF. Exits with the server's status if the server dies on its own.
/// INT, HUP and TERM are ignored: Ctrl-C, a closed terminal or `timeout` signal the whole
/// foreground process group, and the wrapper must outlive the test process to clean up.
const WRAPPER: &str = r#"
pidfile=$1; shift
exec 3<&0 </dev/null
setsid "$@" 3<&- &
p=$!
echo "$p" >"$pidfile.tmp" && mv -f "$pidfile.tmp" "$pidfile"
trap '' INT HUP TERM
{ read -r _ <&3; kill -TERM -- "-$p" 2>/dev/null; } &
w=$!
wait "$p"; s=$?
kill -KILL -- "-$p" 2>/dev/null
kill -KILL "$w" 2>/dev/null
rm -f "$pidfile"
exit "$s"
"#;

/// Waits for EOF on stdin, then for every wrapper to finish (each removes its pid file),
/// then copies its logs and secrets to `LMP_TEST_SWEEP` when set (see tests/sweep-secrets),
/// then removes the temporary directory unless `LMP_TEST_KEEP` is set.
const REAPER: &str = r#"
trap '' INT HUP TERM
# Tells tests/run-all to wait for this copy before its sweep (see below).
[ -z "${LMP_TEST_SWEEP:-}" ] || : > "$LMP_TEST_SWEEP/${1##*/}.pending"
read -r _
i=0
while [ "$i" -lt 400 ] && compgen -G "$1/pids/*.pid" >/dev/null; do sleep 0.05; i=$((i+1)); done
if [ -n "${LMP_TEST_SWEEP:-}" ]; then
  # tests/run-all looks for every secret of the run in every log once the suite is done.
  dest="$LMP_TEST_SWEEP/${1##*/}"
  mkdir -p "$dest" && (cd "$1" && find . -type f \( -path './log/*' -o -path './inetd/*' \
    -o -name '*.log' -o -name '*.stderr' -o -name '*.stdout' -o -name journal \
    -o -path './oauth2/secrets/*' -o -path './passwd/*' \) -exec cp --parents -t "$dest" {} +)
  rm -f -- "$dest.pending"
fi
[ -n "${LMP_TEST_KEEP:-}" ] || rm -rf -- "$1"
"#;

/// A pipe whose write end we hold; the child on the other end acts when it closes.
pub struct Lifeline {
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
}

impl Lifeline {
    /// Closes the pipe now and waits for the child (the wrapper or the reaper) to finish.
    pub fn cut(&self) {
        self.stdin.lock().unwrap().take();
        let _ = self.child.lock().unwrap().wait();
    }

    fn try_wait(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }
}

/// A failed start drops its server: kill it and wait, so that a retry never races with
/// the old wrapper. (The servers kept in statics are never dropped.)
impl Drop for Lifeline {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Starts the process that removes `dir` once all servers are gone.
pub fn spawn_reaper(dir: &Path) -> Result<Lifeline, String> {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(REAPER)
        .arg("lmp-reaper")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run bash for the cleanup process: {e}"))?;
    let stdin = child.stdin.take();
    Ok(Lifeline {
        child: Mutex::new(child),
        stdin: Mutex::new(stdin),
    })
}

/// A server started through the wrapper.
pub struct ServerProcess {
    pub name: String,
    /// The server's pid, which is also its process group id and session id.
    pub pid: u32,
    pub stdout_file: PathBuf,
    pub stderr_file: PathBuf,
    /// Extra log files (written by the server itself) shown when it fails.
    pub log_files: Vec<PathBuf>,
    lifeline: Lifeline,
}

impl ServerProcess {
    /// Starts `argv` under the wrapper; stdout and stderr go to `dir/log/NAME.{stdout,stderr}`.
    pub fn spawn(
        dir: &Path,
        name: &str,
        argv: &[&dyn AsRef<std::ffi::OsStr>],
        log_files: Vec<PathBuf>,
    ) -> Result<ServerProcess, String> {
        let stdout_file = dir.join("log").join(format!("{name}.stdout"));
        let stderr_file = dir.join("log").join(format!("{name}.stderr"));
        let pidfile = dir.join("pids").join(format!("{name}.pid"));
        let open = |p: &Path| File::create(p).map_err(|e| format!("create {}: {e}", p.display()));
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg("lmp-wrapper")
            .arg(&pidfile)
            .stdin(Stdio::piped())
            .stdout(open(&stdout_file)?)
            .stderr(open(&stderr_file)?)
            .current_dir(dir);
        for a in argv {
            cmd.arg(a);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run bash to start {name}: {e}"))?;
        let stdin = child.stdin.take();
        let lifeline = Lifeline {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
        };
        let mut server = ServerProcess {
            name: name.to_string(),
            pid: 0,
            stdout_file,
            stderr_file,
            log_files,
            lifeline,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = fs::read_to_string(&pidfile)
                && let Ok(pid) = s.trim().parse::<u32>()
            {
                server.pid = pid;
                return Ok(server);
            }
            if let Some(status) = server.lifeline.try_wait() {
                return Err(server.failure(&format!("exited at once ({status})")));
            }
            if Instant::now() > deadline {
                return Err(server.failure("did not write its pid file"));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// `Some(status)` once the server has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.lifeline.try_wait()
    }

    /// Kills the server (whole process group) and waits until it is gone.
    pub fn stop(&self) {
        self.lifeline.cut();
    }

    /// The server's stdout, stderr and log files, for error messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let files = [&self.stdout_file, &self.stderr_file]
            .into_iter()
            .chain(self.log_files.iter());
        for f in files {
            let text = fs::read(f)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("(cannot read: {e})"));
            let text = tail(&text, 12_000);
            out.push_str(&format!("----- {} -----\n{text}\n", f.display()));
        }
        out
    }

    /// An error message naming the server, the problem and all its logs.
    pub fn failure(&self, what: &str) -> String {
        format!("{} {what}\n{}", self.name, self.logs())
    }

    /// Polls `addr` until a connection reads a first line starting with `greeting`; with
    /// `None` (implicit TLS ports) a successful TCP connection is enough.
    pub fn wait_for_port(
        &self,
        addr: SocketAddr,
        greeting: Option<&str>,
        deadline: Instant,
    ) -> Result<(), String> {
        loop {
            let last = match probe(addr, greeting) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if let Some(status) = self.exited() {
                return Err(self.failure(&format!("exited during startup ({status})")));
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!("not ready on {addr}: {last}")));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls until `path` exists (e.g. a unix socket the server creates).
    pub fn wait_for_path(&self, path: &Path, deadline: Instant) -> Result<(), String> {
        while !path.exists() {
            if let Some(status) = self.exited() {
                return Err(self.failure(&format!("exited during startup ({status})")));
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!("did not create {}", path.display())));
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// One readiness probe: connect, and if a greeting is expected, read the first line.
fn probe(addr: SocketAddr, greeting: Option<&str>) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    let Some(greeting) = greeting else {
        return Ok(());
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1024 && !line.ends_with(b"\n") {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("read greeting: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&line);
    if line.starts_with(greeting) {
        // Be polite so the server does not log an error for every probe.
        let _ = s.write_all(if greeting.starts_with('*') {
            b"p LOGOUT\r\n"
        } else {
            b"QUIT\r\n"
        });
        Ok(())
    } else {
        Err(format!("unexpected greeting {line:?}"))
    }
}

/// `n` distinct free TCP ports on `ip`. All listeners are held until all ports are picked.
pub fn free_ports(ip: &str, n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((ip, 0)).map_err(|e| format!("bind {ip}:0: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string()))
        .collect()
}

/// How many times [`start_on_free_ports`] tries before it gives up.
const PORT_ATTEMPTS: u32 = 3;

/// Starts a server on `n` free ports of 127.0.0.1 (where every test server listens),
/// retrying with new ports when the start failed because one of them was taken.
///
/// Why: [`free_ports`] must release its listeners before the server can bind the ports,
/// and another process (a parallel test binary, another developer's run) may bind one of
/// them in between. `try_start` writes the config for the ports it is given, starts the
/// server and waits until it is ready; whatever it started must be dropped (so stopped) when
/// it fails. `port_clash` says whether its error means a port was taken (e.g.
/// [`address_in_use`]); only such errors are retried, at most [`PORT_ATTEMPTS`] times in all.
pub fn start_on_free_ports<T>(
    n: usize,
    port_clash: impl Fn(&str) -> bool,
    mut try_start: impl FnMut(&[u16]) -> Result<T, String>,
) -> Result<T, String> {
    let mut attempt = 1;
    loop {
        let ports = free_ports("127.0.0.1", n)?;
        match try_start(&ports) {
            Err(e) if attempt < PORT_ATTEMPTS && port_clash(&e) => {
                eprintln!("start on ports {ports:?} failed (attempt {attempt}), new ports: {e}");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The bind error that C servers (Dovecot, Postfix, Exim, OpenSMTPD) log: strerror(EADDRINUSE).
pub fn address_in_use(error: &str) -> bool {
    error.contains("Address already in use")
}

/// Pids of processes in process group `pgid` that are still alive (not zombies).
pub fn live_process_group_members(pgid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            pids.push(pid);
        }
    }
    pids
}

/// Runs the ignored test `test_name` of the current test binary in a child process and
/// returns what it printed after `LMP-CHILD ` (pids, directories…). For tests of what is
/// left once a test process has exited.
pub fn run_child_test(test_name: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .env_remove("LMP_TEST_KEEP")
        .args([
            "--ignored",
            "--exact",
            test_name,
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("LMP-CHILD ").map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| panic!("no LMP-CHILD line in child output:\n{stdout}"))
}
