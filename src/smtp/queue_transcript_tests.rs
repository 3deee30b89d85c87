//! Transcripts of `smtp --queue-dir` against the in-memory relay: `250` naming the queue
//! id only once the message is durable, delivery right after the reply, a backend that is
//! down or deferring no longer costing the client a `4yz`, permanent refusals still passed
//! on at RCPT, and the queue's own `452`/`451`. Each run gets a fresh queue directory and
//! is replayed at several read sizes, with idle ticks.

use super::memory::MemoryRelay;
use super::reply::Reply;
use super::session::Config;
use super::transcript_tests::{DATED, GREETING, config, feed, run_once};
use crate::smtp::queue::deliver::{DEFAULT_LIFETIME, Policy};
use crate::smtp::queue::{Envelope, Queue, QueueMode};
use std::path::PathBuf;

struct QueuedRun {
    /// The replies, with the queue id replaced by `<ID>`.
    out: String,
    relay: MemoryRelay,
    /// Envelopes left in the queue.
    left: Vec<Envelope>,
    /// Ids the replies named.
    ids: Vec<String>,
    tombstones: Vec<String>,
}

fn queue_dir(name: &str, run: usize) -> PathBuf {
    std::env::temp_dir().join(format!("lmp-smtpq-{}-{name}-{run}", std::process::id()))
}

fn queue_config(dir: PathBuf, max_size: Option<u64>) -> Config {
    let mut c = config();
    c.queue = Some(QueueMode {
        queue: Queue::new(dir, max_size),
        policy: Policy {
            lifetime: DEFAULT_LIFETIME,
            bounce_to: None,
            hostname: "mx.test".into(),
        },
    });
    c
}

/// Runs `input` at several read sizes, each with a fresh queue; all must agree.
fn queued(
    name: &str,
    setup: impl Fn(&mut MemoryRelay),
    prepare: impl Fn(&Config),
    max_size: Option<u64>,
    input: &str,
) -> QueuedRun {
    let mut first: Option<QueuedRun> = None;
    for (run, (chunk, ticks)) in [(input.len(), false), (1, false), (3, true), (64, true)]
        .into_iter()
        .enumerate()
    {
        let dir = queue_dir(name, run);
        let _ = std::fs::remove_dir_all(&dir);
        let config = queue_config(dir.clone(), max_size);
        prepare(&config);
        let mut relay = MemoryRelay::default();
        setup(&mut relay);
        let (out, _) = run_once(&config, &mut relay, feed(input.as_bytes(), chunk, ticks));
        let queue = &config.queue.as_ref().unwrap().queue;
        let left = queue
            .ids()
            .unwrap_or_default()
            .iter()
            .map(|id| queue.envelope(id).unwrap())
            .collect();
        let mut ids = Vec::new();
        let mut masked = String::new();
        for line in out.split_inclusive("\r\n") {
            match line.split_once("queued as ") {
                Some((start, id)) => {
                    ids.push(id.trim_end().to_string());
                    masked.push_str(&format!("{start}queued as <ID>\r\n"));
                }
                None => masked.push_str(line),
            }
        }
        let tombstones = std::fs::read_dir(dir.join("delivered"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&dir);
        let this = QueuedRun {
            out: masked,
            relay,
            left,
            ids,
            tombstones,
        };
        match &first {
            None => first = Some(this),
            Some(f) => {
                assert_eq!(this.out, f.out, "replies with chunks of {chunk}");
                assert_eq!(
                    this.relay.log.len(),
                    f.relay.log.len(),
                    "{:?}",
                    this.relay.log
                );
                assert_eq!(this.left.len(), f.left.len());
            }
        }
    }
    first.unwrap()
}

fn message() -> String {
    format!("From: a@c.example\r\nSubject: scan\r\n{DATED}\r\npage 1\r\n")
}

fn session(rcpts: &[&str], quit: bool) -> String {
    let mut s = "EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n".to_string();
    for r in rcpts {
        s.push_str(&format!("RCPT TO:<{r}>\r\n"));
    }
    s.push_str(&format!("DATA\r\n{}.\r\n", message()));
    if quit {
        s.push_str("QUIT\r\n");
    }
    s
}

const EHLO: &str = "250-mx.test greets c.example\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n";
const DATA_354: &str = "354 End data with <CR><LF>.<CR><LF>\r\n";

#[test]
fn the_final_dot_names_the_queue_id_and_the_message_goes_out_at_once_on_the_open_transaction() {
    let run = queued("up", |_| {}, |_| {}, None, &session(&["b@d.example"], true));
    assert_eq!(
        run.out,
        [
            GREETING,
            EHLO,
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            DATA_354,
            "250 2.0.0 Ok: queued as <ID>\r\n",
            "221 2.0.0 Bye\r\n"
        ]
        .concat()
    );
    // MAIL and RCPT went upstream while the client was there; after its 250 only DATA.
    assert_eq!(
        run.relay.log,
        [
            "CONNECT",
            "MAIL FROM:<a@c.example>",
            "RCPT TO:<b@d.example>",
            "DATA",
            &format!("MESSAGE {}", message().len()),
            "QUIT"
        ]
    );
    assert_eq!(run.relay.delivered[0].data, message().as_bytes());
    assert!(run.left.is_empty(), "{:?}", run.left);
    assert_eq!(run.tombstones, run.ids, "the delivered id is remembered");
}

#[test]
fn a_client_that_hangs_up_after_its_250_still_gets_its_message_delivered() {
    let run = queued(
        "hangup",
        |_| {},
        |_| {},
        None,
        &session(&["b@d.example"], false),
    );
    assert!(
        run.out.ends_with("250 2.0.0 Ok: queued as <ID>\r\n"),
        "{}",
        run.out
    );
    assert_eq!(run.relay.delivered.len(), 1);
    assert!(run.left.is_empty());
}

#[test]
fn a_backend_that_is_down_costs_the_client_nothing_the_message_waits_in_the_queue() {
    let run = queued(
        "down",
        |r| r.down = true,
        |_| {},
        None,
        &session(&["b@d.example", "c@d.example"], true),
    );
    assert_eq!(
        run.out,
        [
            GREETING,
            EHLO,
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            DATA_354,
            "250 2.0.0 Ok: queued as <ID>\r\n",
            "221 2.0.0 Bye\r\n"
        ]
        .concat()
    );
    assert!(run.relay.delivered.is_empty());
    let [envelope] = run.left.as_slice() else {
        panic!("{:?}", run.left)
    };
    assert_eq!(envelope.id, run.ids[0]);
    assert_eq!(envelope.from, "a@c.example");
    assert_eq!(envelope.to, ["b@d.example", "c@d.example"]);
    assert_eq!(envelope.account, None);
    assert_eq!(envelope.attempts, 0);
    assert!(
        envelope
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("connection refused")),
        "{envelope:?}"
    );
}

#[test]
fn a_permanent_rcpt_refusal_is_still_550_at_once_and_a_deferral_is_queued() {
    let run = queued(
        "rcpt",
        |r| {
            r.unknown = vec!["nobody@d.example".into()];
            r.rcpt_replies = vec![(
                "later@d.example".into(),
                Reply::from_backend(450, &["4.2.0 greylisted"]),
            )];
        },
        |_| {},
        None,
        &session(
            &["b@d.example", "nobody@d.example", "later@d.example"],
            true,
        ),
    );
    assert!(
        run.out.contains(
            "250 2.1.5 Ok\r\n550 5.1.1 <nobody@d.example>: Recipient address rejected: User unknown\r\n250 2.1.5 Ok\r\n"
        ),
        "{}",
        run.out
    );
    assert!(run.out.contains("250 2.0.0 Ok: queued as <ID>\r\n"));
    // The backend deferred a recipient: the whole message waits for `queue run`, which
    // sends it fresh (the refused recipient is not in it).
    assert!(run.relay.delivered.is_empty());
    assert_eq!(run.left[0].to, ["b@d.example", "later@d.example"]);
    assert!(
        run.relay.log.contains(&"RSET".to_string()),
        "{:?}",
        run.relay.log
    );
}

#[test]
fn a_refusal_after_data_reaches_the_sender_as_a_dsn() {
    let run = queued(
        "dsn",
        |r| {
            r.data_reply_once = Some(Reply::from_backend(
                554,
                &["5.7.1 message content rejected"],
            ))
        },
        |_| {},
        None,
        &session(&["b@d.example"], true),
    );
    assert!(
        run.out.contains("250 2.0.0 Ok: queued as <ID>\r\n"),
        "{}",
        run.out
    );
    let [dsn] = run.relay.delivered.as_slice() else {
        panic!("{:?}", run.relay.log)
    };
    assert_eq!(
        (dsn.from.as_str(), dsn.to.as_slice()),
        ("", &["a@c.example".to_string()][..])
    );
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("Status: 5.7.1\r\n"), "{text}");
    assert!(text.contains(&run.ids[0]), "{text}");
    assert!(run.left.is_empty());
}

#[test]
fn a_connection_lost_during_the_immediate_delivery_leaves_the_message_queued() {
    let run = queued(
        "lost",
        |r| r.data_error = Some(super::relay::RelayError::Lost("reset by peer".into())),
        |_| {},
        None,
        &session(&["b@d.example"], true),
    );
    assert!(
        run.out.contains("250 2.0.0 Ok: queued as <ID>\r\n"),
        "{}",
        run.out
    );
    let [envelope] = run.left.as_slice() else {
        panic!("{:?}", run.left)
    };
    assert_eq!(envelope.attempts, 1);
    assert!(
        envelope
            .last_error
            .as_deref()
            .unwrap()
            .contains("reset by peer")
    );
    assert!(run.tombstones.is_empty());
}

#[test]
fn a_full_queue_answers_452_4_3_1_and_the_backend_gets_nothing() {
    let run = queued(
        "full",
        |_| {},
        |_| {},
        Some(10),
        &session(&["b@d.example"], true),
    );
    assert!(
        run.out.contains(&format!(
            "{DATA_354}452 4.3.1 Insufficient system storage: mail queue full; try again later\r\n"
        )),
        "{}",
        run.out
    );
    assert!(run.relay.delivered.is_empty());
    assert!(run.left.is_empty());
    assert!(run.relay.log.contains(&"RSET".to_string()));
}

#[test]
fn an_unwritable_queue_answers_451_4_3_0() {
    let run = queued(
        "unwritable",
        |_| {},
        // A file where the directory should be: even root cannot write into it.
        |c| std::fs::write(&c.queue.as_ref().unwrap().queue.dir, b"x").unwrap(),
        None,
        &session(&["b@d.example"], true),
    );
    assert!(
        run.out
            .contains("451 4.3.0 Local error: cannot queue the message; try again later\r\n"),
        "{}",
        run.out
    );
    assert!(run.relay.delivered.is_empty());
}

#[test]
fn a_backend_lost_while_a_slow_client_sends_leaves_the_message_for_the_queue() {
    let dir = queue_dir("keepalive", 0);
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = queue_config(dir.clone(), None);
    // Every idle tick is a keepalive, and the backend drops the connection at the first.
    config.keepalive = config.tick;
    let mut relay = MemoryRelay::default();
    relay.drop_at = Some("NOOP".into());
    let input = session(&["b@d.example"], true);
    let (out, _) = run_once(&config, &mut relay, feed(input.as_bytes(), 16, true));
    let queue = &config.queue.as_ref().unwrap().queue;
    let ids = queue.ids().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.contains(&format!("250 2.0.0 Ok: queued as {}\r\n", ids[0])),
        "{out}"
    );
    assert!(!out.contains("451"), "{out}");
    assert!(relay.delivered.is_empty(), "{:?}", relay.log);
    assert!(
        relay.log.contains(&"DROPPED".to_string()),
        "{:?}",
        relay.log
    );
}
