//! The benchmark (issue 5): this proxy side by side with direct access and with Dovecot
//! used as the same kind of gateway, in one run, on the same backend and the same data.
//!
//! Not part of the test suite: the one test here is `#[ignore]`d and asserts nothing about
//! time. Run it with `sudo ./tests/bench/run`, which builds in release mode, starts the
//! servers (the harness in `tests/common`) and writes `tests/bench/RESULTS.md`.
//!
//! Columns, each reached by the same client code (`client.rs`):
//! - **direct**: the backend Dovecot's own POP3 (with STLS) and Postfix's own submission
//!   (implicit TLS). This is the floor.
//! - **Dovecot gateway**: a second Dovecot (`common::gateway`) whose POP3 reads the backend
//!   with imapc and whose submission relays to Postfix; plain text from the client.
//! - **proxy**: `legacy-mail-proxy`, spawned for every connection with the socket on
//!   stdin/stdout (`common::Inetd`, as inetd does); plain text from the client.
//!
//! So every path encrypts exactly once: the direct client talks TLS to the server, while a
//! legacy client talks plain text on the LAN (loopback here) to a gateway that talks
//! implicit TLS to the backend, verified against the test CA. Both gateways log in with the
//! client's own user and password.
//!
//! Method: one untimed warm-up per column and workload (it fills Dovecot's caches and the
//! gateway's imapc index), then `LMP_BENCH_REPS` timed runs per column, the columns in a
//! rotating order so none always runs first. The figure is the median. Peak RSS is
//! `VmHWM` of the process serving the session, read just before QUIT (that read is not
//! timed). SMTP runs wait, untimed, until Postfix has delivered every message into the
//! backend, then the messages are expunged, so one run's deliveries never overlap the next.
//!
//! Environment: `LMP_BENCH_SCALE` (default 1) scales message counts and sizes for quick
//! trials, `LMP_BENCH_REPS` (default 11), `LMP_BENCH_ONLY` (comma-separated workload names),
//! `LMP_BENCH_RESULTS` (file for the Markdown results), and `LMP_BENCH_WRAP`: a command
//! prefix for every proxy process, for profiling, e.g.
//! `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p` or
//! `perf record -e cpu-clock -g -o /tmp/perf.$$ --` (peak RSS is then not sampled).

#[path = "../common/mod.rs"]
mod common;

mod client;
mod corpus;
mod report;

use client::{Endpoint, Pop3, Smtp, Tls};
use common::{Inetd, User, gateway, postfix, proxy_bin, servers};
use report::{COLUMNS, Column, Outcome, Sample};
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const CONNECT: &str = "connect";
const DOWNLOAD: &str = "download";
const BIG: &str = "big-message";
const MAILBOX: &str = "big-mailbox";
const SMTP_SMALL: &str = "smtp-small";
const SMTP_LARGE: &str = "smtp-large";
const WORKLOADS: [&str; 6] = [CONNECT, DOWNLOAD, BIG, MAILBOX, SMTP_SMALL, SMTP_LARGE];

struct Settings {
    scale: f64,
    reps: usize,
    only: Vec<String>,
    results: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let scale = var("LMP_BENCH_SCALE").map_or(1.0, |v| {
            v.parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0)
                .expect("LMP_BENCH_SCALE must be a positive number")
        });
        let reps = var("LMP_BENCH_REPS").map_or(11, |v| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .expect("LMP_BENCH_REPS must be a positive whole number")
        });
        let only: Vec<String> = var("LMP_BENCH_ONLY")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default();
        for name in &only {
            assert!(
                WORKLOADS.contains(&name.as_str()),
                "LMP_BENCH_ONLY: unknown workload {name}; known: {}",
                WORKLOADS.join(", ")
            );
        }
        Settings {
            scale,
            reps,
            only,
            results: var("LMP_BENCH_RESULTS").map(PathBuf::from),
        }
    }

    /// `full` scaled, at least 1.
    fn n(&self, full: usize) -> usize {
        ((full as f64 * self.scale).round() as usize).max(1)
    }

    fn wants(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }
}

#[test]
#[ignore = "benchmark, minutes long: run ./tests/bench/run"]
fn benchmark() {
    let settings = Settings::from_env();
    let load_before = loadavg();
    let started = Instant::now();
    let mut bench = Bench::new(settings);
    bench.run();
    let outcomes = std::mem::take(&mut bench.outcomes);
    let text = results(&bench.settings, &outcomes, &load_before, started.elapsed());
    println!("\n{text}");
    if let Some(path) = &bench.settings.results {
        fs::write(path, &text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        println!("results written to {}", path.display());
    }
}

struct Bench {
    settings: Settings,
    tls: native_tls::TlsConnector,
    outcomes: Vec<Outcome>,
}

/// A session failed: the benchmark stops with the reason.
fn fail(workload: &str, column: Column, error: String) -> ! {
    panic!(
        "{workload} via {}: {error}\n(server logs: LMP_TEST_KEEP=1 keeps {})",
        column.label(),
        servers().dir.display()
    )
}

impl Bench {
    fn new(settings: Settings) -> Bench {
        let s = servers();
        Bench {
            tls: client::connector(&s.ca_file),
            settings,
            outcomes: Vec::new(),
        }
    }

    fn run(&mut self) {
        let pop3 = [CONNECT, DOWNLOAD, BIG, MAILBOX]
            .iter()
            .any(|w| self.settings.wants(w));
        if pop3 {
            self.pop3_workloads();
        }
        if self.settings.wants(SMTP_SMALL) || self.settings.wants(SMTP_LARGE) {
            self.smtp_workloads();
        }
    }

    /// Warm-up, then `reps` interleaved runs of `f` per column.
    fn measure(
        &mut self,
        name: &'static str,
        what: String,
        sessions: usize,
        rss_limit_kib: Option<u64>,
        mut f: impl FnMut(Column, bool) -> client::Result<Sample>,
    ) {
        eprintln!("[{name}] {what}");
        for c in COLUMNS {
            let t = Instant::now();
            f(c, true).unwrap_or_else(|e| fail(name, c, e));
            eprintln!(
                "[{name}] {} warm-up: {:.3} s",
                c.label(),
                t.elapsed().as_secs_f64()
            );
        }
        let mut samples: [Vec<Sample>; 3] = Default::default();
        for rep in 0..self.settings.reps {
            for k in 0..COLUMNS.len() {
                let c = COLUMNS[(rep + k) % COLUMNS.len()];
                let sample = f(c, false).unwrap_or_else(|e| fail(name, c, e));
                eprintln!(
                    "[{name}] {} run {}/{}: {:.3} s{}",
                    c.label(),
                    rep + 1,
                    self.settings.reps,
                    sample.secs,
                    sample
                        .rss_kib
                        .map_or(String::new(), |k| format!(", peak RSS {k} KiB"))
                );
                samples[c.index()].push(sample);
            }
        }
        self.outcomes.push(Outcome {
            name,
            what,
            sessions,
            samples,
            rss_limit_kib,
        });
    }

    fn pop3_workloads(&mut self) {
        let s = servers();
        let g = gateway();
        let locks = s.dir.join("bench-locks");
        let inetd = spawn_per_connection(&[
            "--log",
            "stderr",
            "pop3",
            "--imap-host",
            s.tls_host,
            "--imap-tls",
            "implicit",
            "--imap-port",
            &s.imaps_port.to_string(),
            "--ca-file",
            &s.ca_file.display().to_string(),
            "--lock-dir",
            &locks.display().to_string(),
        ]);
        let direct = Endpoint {
            port: s.pop3_port,
            tls: Tls::Stls,
        };
        let endpoints = columns(direct, g.pop3_port, inetd.port);
        let ep = |c: Column| endpoints[c.index()].clone();

        if self.settings.wants(CONNECT) {
            let user = seed("connect", |each| {
                let mut rng = corpus::Rng::new(7);
                for i in 0..10 {
                    let size = rng.range(2 << 10, 5 << 10);
                    each(&corpus::text(&mut rng, &format!("connect-{i}"), size));
                }
            });
            let n = self.settings.n(300);
            let what = format!(
                "{n} sessions one after the other, each: connect, USER/PASS, STAT, QUIT \
                 (mailbox of 10 messages); time per session"
            );
            let tls = self.tls.clone();
            self.measure(CONNECT, what, n, None, |c, warmup| {
                let sessions = if warmup { n.min(10) } else { n };
                let start = Instant::now();
                for _ in 0..sessions {
                    let mut p = Pop3::connect(&ep(c), &tls)?;
                    p.login(&user.name, &user.password)?;
                    p.stat()?;
                    p.quit()?;
                }
                Ok(Sample {
                    secs: start.elapsed().as_secs_f64(),
                    rss_kib: None,
                })
            });
            check_logs(&inetd);
        }

        if self.settings.wants(DOWNLOAD) {
            let n = self.settings.n(2000);
            let mut total = 0usize;
            let user = seed("download", |each| {
                corpus::mixed(n, |m| {
                    total += m.len();
                    each(m);
                })
            });
            let what = format!(
                "one session: USER/PASS, STAT, RETR of each of {n} messages of mixed sizes \
                 ({:.1} MB in all: 1 KiB–1 MiB, text and base64 attachments), QUIT",
                total as f64 / 1e6
            );
            let tls = self.tls.clone();
            self.measure(DOWNLOAD, what, 1, None, |c, _| {
                retrieve_all(&ep(c), &tls, &user, c)
            });
            check_logs(&inetd);
        }

        if self.settings.wants(BIG) {
            let size = self.settings.n(50 << 20);
            let user = seed("big", |each| {
                each(&corpus::attachment(&mut corpus::Rng::new(3), "big", size))
            });
            let what = format!(
                "one session: USER/PASS, STAT, RETR of one {:.1} MiB message (base64 \
                 attachment), QUIT; with the peak RSS of the serving process",
                size as f64 / (1 << 20) as f64
            );
            let tls = self.tls.clone();
            self.measure(BIG, what, 1, Some(16 << 10), |c, _| {
                retrieve_all(&ep(c), &tls, &user, c)
            });
            check_logs(&inetd);
        }

        if self.settings.wants(MAILBOX) {
            let n = self.settings.n(20_000);
            let user = seed("mailbox", |each| {
                let mut rng = corpus::Rng::new(11);
                for i in 0..n {
                    let size = rng.range(1 << 10, 3 << 10);
                    each(&corpus::text(&mut rng, &format!("many-{i}"), size));
                }
            });
            let what = format!(
                "one session: USER/PASS, STAT, LIST, UIDL, QUIT on a mailbox of {n} messages"
            );
            let tls = self.tls.clone();
            self.measure(MAILBOX, what, 1, None, |c, _| {
                let start = Instant::now();
                let mut p = Pop3::connect(&ep(c), &tls)?;
                p.login(&user.name, &user.password)?;
                let (count, _) = p.stat()?;
                for command in ["LIST", "UIDL"] {
                    let body = p.multiline(command)?;
                    if body.lines != count || count != n as u64 {
                        return Err(format!(
                            "{command} listed {} messages, STAT {count}, seeded {n}",
                            body.lines
                        ));
                    }
                }
                finish(p, c, start)
            });
            check_logs(&inetd);
        }
    }

    fn smtp_workloads(&mut self) {
        let s = servers();
        let p = postfix();
        let g = gateway();
        let inetd = spawn_per_connection(&[
            "--log",
            "stderr",
            "smtp",
            "--smtp-host",
            s.tls_host,
            "--smtp-tls",
            "implicit",
            "--smtp-port",
            &p.submissions_port.to_string(),
            "--ca-file",
            &s.ca_file.display().to_string(),
            "--client-auth",
            "passthrough",
            "--hostname",
            "proxy.bench.test",
        ]);
        let direct = Endpoint {
            port: p.submissions_port,
            tls: Tls::Implicit,
        };
        let endpoints = columns(direct, g.submission_port, inetd.port);
        let sender = s.new_user("sender");
        let recipient = s.new_user("recipient");

        let workloads = [
            (SMTP_SMALL, self.settings.n(500), 10 << 10),
            // 10,000,000 octets: Postfix's default message_size_limit is 10,240,000.
            (SMTP_LARGE, self.settings.n(10), self.settings.n(10_000_000)),
        ];
        for (name, count, size) in workloads {
            if !self.settings.wants(name) {
                continue;
            }
            let mut rng = corpus::Rng::new(5);
            let messages: Vec<Vec<u8>> = (0..count)
                .map(|i| corpus::dot_stuffed(&corpus::text(&mut rng, &format!("{name}-{i}"), size)))
                .collect();
            let octets = messages[0].len() as f64;
            let what = format!(
                "one session: EHLO, AUTH PLAIN, then {count} × (MAIL, RCPT, DATA) of {} text \
                 messages, QUIT; timed until the last message is accepted (delivery into the \
                 backend is awaited untimed afterwards)",
                if octets >= 1e6 {
                    format!("{:.1} MB", octets / 1e6)
                } else {
                    format!("{:.1} kB", octets / 1e3)
                }
            );
            let tls = self.tls.clone();
            let (sender, recipient) = (&sender, &recipient);
            self.measure(name, what, 1, None, |c, _| {
                let start = Instant::now();
                let mut smtp = Smtp::connect(&endpoints[c.index()], &tls)?;
                smtp.ehlo_auth(&sender.name, &sender.password)?;
                for m in &messages {
                    smtp.send(&sender.email, &recipient.email, m)?;
                }
                let probe = Instant::now();
                let rss_kib = serving_rss(c);
                let probe_time = probe.elapsed();
                smtp.quit()?;
                let secs = (start.elapsed() - probe_time).as_secs_f64();
                drain(recipient, messages.len());
                Ok(Sample { secs, rss_kib })
            });
            check_logs(&inetd);
        }
    }
}

/// Where each column is reached: `direct` as given, both gateways in plain text.
fn columns(direct: Endpoint, gateway_port: u16, proxy_port: u16) -> [Endpoint; 3] {
    let plain = |port| Endpoint {
        port,
        tls: Tls::None,
    };
    [direct, plain(gateway_port), plain(proxy_port)]
}

/// The proxy with `args`, spawned for every connection like inetd would, under the
/// `LMP_BENCH_WRAP` prefix if one is set.
fn spawn_per_connection(args: &[&str]) -> Inetd {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    match std::env::var("LMP_BENCH_WRAP") {
        Ok(wrap) if !wrap.trim().is_empty() => {
            let mut wrapped = vec![
                "-c".to_string(),
                format!("exec {wrap} \"$@\""),
                "lmp-bench-wrap".to_string(),
                proxy_bin().to_string(),
            ];
            wrapped.extend(args);
            Inetd::start("bash", &wrapped, &[])
        }
        _ => Inetd::start(proxy_bin(), &args, &[]),
    }
}

/// USER/PASS, STAT, RETR of every message, QUIT. Checks that every column delivers exactly
/// the octets STAT promised.
fn retrieve_all(
    ep: &Endpoint,
    tls: &native_tls::TlsConnector,
    user: &User,
    c: Column,
) -> client::Result<Sample> {
    let start = Instant::now();
    let mut p = Pop3::connect(ep, tls)?;
    p.login(&user.name, &user.password)?;
    let (count, octets) = p.stat()?;
    let mut got = 0;
    for i in 1..=count {
        got += p.multiline(&format!("RETR {i}"))?.octets;
    }
    if got != octets {
        return Err(format!("RETR gave {got} octets, STAT promised {octets}"));
    }
    finish(p, c, start)
}

/// Samples the serving process's peak RSS, sends QUIT, and returns the time since `start`
/// without the sampling.
fn finish(p: Pop3, c: Column, start: Instant) -> client::Result<Sample> {
    let probe = Instant::now();
    let rss_kib = serving_rss(c);
    let probe_time = probe.elapsed();
    p.quit()?;
    Ok(Sample {
        secs: (start.elapsed() - probe_time).as_secs_f64(),
        rss_kib,
    })
}

/// A new account whose INBOX holds the messages `fill` produces, written straight into the
/// Maildir and then indexed once.
///
/// The files are named the way Dovecot's own delivery names them, with `,S=<size>,W=<virtual
/// size>` (Maildir++), so Dovecot never has to read a file to learn its size, as on a real
/// server. (`User::seed` leaves the sizes out; Dovecot then caches them only as its adaptive
/// cache decisions allow, and STAT/LIST on 20,000 messages took 0.05 s in one run and 0.25 s
/// in the next, for direct access and the proxy alike.) Every message here has CRLF line
/// endings, so both sizes are the file's length.
fn seed(prefix: &str, fill: impl FnOnce(&mut dyn FnMut(&[u8]))) -> User {
    use std::os::unix::fs::{PermissionsExt, chown};
    let s = servers();
    let user = s.new_user(prefix);
    let t = Instant::now();
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut count = 0u64;
    fill(&mut |m: &[u8]| {
        assert!(
            !m.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
            "bench messages must use CRLF"
        );
        // Dovecot assigns UIDs to new files in the order of the time stamp in their names.
        let name = format!(
            "{}.M{}P{}Q{count}.bench,S={size},W={size}",
            base + count / 1_000_000,
            count % 1_000_000,
            std::process::id(),
            size = m.len()
        );
        let tmp = user.maildir.join("tmp").join(&name);
        fs::write(&tmp, m).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        chown(&tmp, Some(s.mail_uid), Some(s.mail_gid)).expect("chown message");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).expect("chmod message");
        fs::rename(&tmp, user.maildir.join("new").join(&name)).expect("rename message");
        count += 1;
    });
    user.resync();
    eprintln!(
        "seeded {count} messages for {} in {:.1} s",
        user.name,
        t.elapsed().as_secs_f64()
    );
    user
}

/// Waits until Postfix has delivered `n` messages to `user`, then expunges them.
fn drain(user: &User, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while user.maildir_count() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages delivered to {} after 10 minutes:\n{}",
            user.maildir_count(),
            user.name,
            postfix().logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = servers().doveadm(&["expunge", "-u", &user.name, "mailbox", "INBOX", "all"]);
    assert!(
        out.status.success(),
        "doveadm expunge: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reaps the proxy processes spawned so far and fails on a crash in their logs.
fn check_logs(inetd: &Inetd) {
    let logs = inetd.logs();
    assert!(
        !logs.contains("panicked"),
        "a proxy process panicked:\n{logs}"
    );
}

/// One line of /proc/PID/stat: (comm, state, ppid, pgrp).
fn proc_stat(pid: u32) -> Option<(String, char, u32, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let mut f = stat[close + 1..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((comm, state, ppid, pgrp))
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak RSS of the live process serving a gateway column's session: the proxy (a child of
/// this process) or the gateway Dovecot's `pop3`/`submission` process (one per session).
/// Direct access is not measured: its serving processes are the backend's own.
fn serving_rss(c: Column) -> Option<u64> {
    let (me, gateway_pgrp) = (std::process::id(), gateway().pid());
    let pids = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|&pid| {
        let Some((comm, state, ppid, pgrp)) = proc_stat(pid) else {
            return false;
        };
        state != 'Z'
            && match c {
                Column::Direct => false,
                Column::Proxy => ppid == me && comm.starts_with("legacy-mail-pro"),
                Column::Dovecot => pgrp == gateway_pgrp && (comm == "pop3" || comm == "submission"),
            }
    })
    .filter_map(vm_hwm_kib)
    .max()
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// First line of a command's output, or "?".
fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(|l| l.trim().to_string())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("?".into(), |m| m.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1 << 20) as f64);
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or("?".into(), |v| v.trim_matches('"').to_string());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} vCPUs ({model}), {mem_gib:.0} GiB RAM, {os}, Linux {}; a shared virtual \
         machine, so expect noise",
        kernel.trim()
    )
}

fn results(
    settings: &Settings,
    outcomes: &[Outcome],
    load_before: &str,
    elapsed: Duration,
) -> String {
    let commit = output("git", &["rev-parse", "--short", "HEAD"]);
    // `output` gives "?" for no output: a clean tree.
    let dirty = output("git", &["status", "--porcelain", "--", "src", "Cargo.toml"]) != "?";
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let dovecot = output("dovecot", &["--version"]);
    let postfix = output("postconf", &["-d", "-h", "mail_version"]);
    let mut text = format!(
        "# Benchmark results\n\n\
         Written by `sudo ./tests/bench/run` ({date}, commit {commit}{}). \
         Medians of {} runs per column after one warm-up; times per session for \
         `{CONNECT}`, else per run. ✓/✗: the issue's targets (within 1.3× of direct, at or \
         below the Dovecot gateway, peak RSS under 16 MiB on the big message).\n\n\
         - Machine: {}\n\
         - Servers: Dovecot {dovecot}, Postfix {postfix}; the proxy built with \
         `cargo test --release`\n\
         - Scale: {}; whole run {:.1} min; load average before {load_before}, after {}\n\n",
        if dirty {
            ", with uncommitted changes"
        } else {
            ""
        },
        settings.reps,
        machine(),
        settings.scale,
        elapsed.as_secs_f64() / 60.0,
        loadavg(),
    );
    text.push_str("## Summary\n\n");
    text.push_str(&report::table(outcomes));
    text.push_str("\n### Ratios within each round\n\n");
    text.push_str(&report::rounds(outcomes));
    text.push_str(
        "\n## Set-up\n\n\
         - **direct**: the backend Dovecot's own POP3 (STLS) and Postfix's own submission \
         (implicit TLS, port-465 style).\n\
         - **Dovecot gateway**: a second Dovecot 2.3 with `mail_location = imapc:~/imapc`, \
         `passdb imap`, `imapc_features = rfc822.size fetch-headers` and \
         `submission_relay_*` (tests/common/gateway.rs).\n\
         - **proxy**: `legacy-mail-proxy pop3|smtp`, one process per connection with the \
         socket on stdin/stdout (tests/common/inetd.rs), logging at info level to a file.\n\
         - Each path encrypts once: the client↔gateway leg is plain TCP on 127.0.0.1 for both \
         gateways, and both use implicit TLS (verified) to the backend's IMAP and \
         submission ports; the direct client uses TLS itself. Both gateways log in to the \
         backend with the client's own credentials.\n\
         - One client program for all columns (tests/bench/client.rs): sequential commands, \
         no pipelining, 64 KiB buffered reads; it checks that RETR returns the octets STAT \
         announced and that LIST and UIDL list every message.\n\
         - Peak RSS: `VmHWM` of the process serving the session (the proxy, or the gateway \
         Dovecot's `pop3`/`submission` process), read just before QUIT.\n\n\
         ## Workloads\n\n",
    );
    text.push_str(&report::workloads(outcomes));
    text.push_str("\n## Every run\n\n");
    text.push_str(&report::samples(outcomes));
    text
}
