//! A minimal inetd for tests: listens on 127.0.0.1 and spawns the proxy for every
//! connection with the socket as its stdin and stdout, exactly as xinetd or systemd
//! `Accept=yes` would. Real network clients (poplib, curl, fetchmail) then talk to it.
//! Each child's stderr goes to its own file, so tests can read the log lines and prove
//! that nothing but protocol bytes reached the socket.

use std::fs::{self, File};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use super::servers;

pub struct Inetd {
    pub port: u16,
    log_dir: PathBuf,
    spawned: Arc<AtomicUsize>,
    children: Arc<Mutex<Vec<Child>>>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Inetd {
    /// Serves `program args…` with `envs` on a fresh 127.0.0.1 port.
    pub fn start(program: &str, args: &[String], envs: &[(String, String)]) -> Inetd {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test inetd");
        let port = listener.local_addr().unwrap().port();
        let log_dir = servers().dir.join("inetd").join(format!(
            "{}-{}",
            port,
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&log_dir).unwrap();
        let spawned = Arc::new(AtomicUsize::new(0));
        let children = Arc::new(Mutex::new(Vec::new()));
        let (program, args, envs) = (program.to_string(), args.to_vec(), envs.to_vec());
        let (dir, count, kids) = (log_dir.clone(), spawned.clone(), children.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let n = count.load(Ordering::SeqCst);
                let stderr = File::create(dir.join(format!("{n}.log"))).unwrap();
                let input = OwnedFd::from(conn.try_clone().unwrap());
                let output = OwnedFd::from(conn);
                let child = Command::new(&program)
                    .args(&args)
                    .envs(envs.iter().map(|(k, v)| (k, v)))
                    .stdin(Stdio::from(input))
                    .stdout(Stdio::from(output))
                    .stderr(Stdio::from(stderr))
                    .spawn()
                    .expect("spawn proxy");
                kids.lock().unwrap().push(child);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Inetd {
            port,
            log_dir,
            spawned,
            children,
        }
    }

    /// How many connections were served so far.
    pub fn spawned(&self) -> usize {
        self.spawned.load(Ordering::SeqCst)
    }

    /// Waits for every child spawned so far to exit, then returns all their stderr, in
    /// connection order.
    pub fn logs(&self) -> String {
        for child in self.children.lock().unwrap().iter_mut() {
            let _ = child.wait();
        }
        let mut out = String::new();
        for n in 0..self.spawned() {
            out.push_str(
                &fs::read_to_string(self.log_dir.join(format!("{n}.log"))).unwrap_or_default(),
            );
        }
        out
    }
}
