//! The queue's files, locks, schedule and bounces, against the in-memory relay.

use super::deliver::{self, Outcome, Policy, backoff};
use super::store::{self, NewMessage, Queue, StoreError};
use crate::smtp::memory::MemoryRelay;
use crate::smtp::reply::Reply;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// A queue directory removed when the test ends.
struct TempQueue {
    queue: Queue,
}

impl Drop for TempQueue {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.queue.dir);
    }
}

fn temp_queue(name: &str, max_size: Option<u64>) -> TempQueue {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("lmp-queue-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    TempQueue {
        queue: Queue::new(dir, max_size),
    }
}

fn new_message(from: &str, to: &[&str]) -> NewMessage {
    NewMessage {
        from: from.into(),
        to: to.iter().map(|t| t.to_string()).collect(),
        account: None,
        client: "192.0.2.1:1234".into(),
        last_error: None,
    }
}

const MESSAGE: &[u8] = b"Subject: hi\r\nMessage-ID: <1@x>\r\n\r\nthe body text\r\n";

fn relay_with(setup: impl FnOnce(&mut MemoryRelay)) -> MemoryRelay {
    let mut relay = MemoryRelay::default();
    setup(&mut relay);
    relay
}

fn policy() -> Policy {
    Policy {
        lifetime: deliver::DEFAULT_LIFETIME,
        bounce_to: None,
        hostname: "gw.example".into(),
    }
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_stored_message_is_two_private_files_locked_by_its_writer() {
    let t = temp_queue("store", None);
    let q = &t.queue;
    let mut locked = q
        .store(
            new_message("a@x", &["b@y"]),
            &mut &MESSAGE[..],
            MESSAGE.len() as u64,
        )
        .unwrap();
    let id = locked.id().to_string();
    assert!(store::valid_id(&id), "{id}");
    assert_eq!(
        names(&q.dir),
        vec![
            format!("{id}.env"),
            format!("{id}.msg"),
            "delivered".to_string(),
            "tmp".into()
        ]
    );
    assert!(names(&q.dir.join("tmp")).is_empty());
    for ext in ["env", "msg"] {
        let mode = fs::metadata(q.dir.join(format!("{id}.{ext}")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{ext}");
    }
    assert_eq!(
        fs::metadata(&q.dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let (file, len) = locked.message().unwrap();
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).unwrap();
    assert_eq!((bytes.as_slice(), len), (MESSAGE, MESSAGE.len() as u64));
    assert_eq!(q.ids().unwrap(), vec![id.clone()]);
    let envelope = q.envelope(&id).unwrap();
    assert_eq!(
        (envelope.from.as_str(), envelope.to.clone()),
        ("a@x", vec!["b@y".into()])
    );
    assert_eq!((envelope.attempts, envelope.held), (0, false));
    // Another opener (another process, or `queue run`) cannot take it while it is held.
    assert!(q.lock(&id).unwrap().is_none());
    drop(locked);
    let again = q.lock(&id).unwrap().expect("free once released");
    q.remove(again).unwrap();
    assert!(q.ids().unwrap().is_empty());
    assert!(q.lock(&id).unwrap().is_none(), "gone");
}

#[test]
fn ids_typed_by_an_admin_cannot_leave_the_queue() {
    for bad in ["", "../x", "a/b", "a.env", "x y", &"A".repeat(65)] {
        assert!(!store::valid_id(bad), "{bad}");
    }
    let t = temp_queue("ids", None);
    assert!(t.queue.lock("../../etc/passwd").unwrap().is_none());
}

#[test]
fn a_full_queue_refuses_and_leaves_nothing() {
    let t = temp_queue("full", Some(100));
    let q = &t.queue;
    let first = q
        .store(
            new_message("a@x", &["b@y"]),
            &mut &MESSAGE[..],
            MESSAGE.len() as u64,
        )
        .unwrap();
    drop(first);
    let big = vec![b'x'; 80];
    match q.store(new_message("a@x", &["b@y"]), &mut big.as_slice(), 80) {
        Err(StoreError::Full { used, max }) => {
            assert_eq!((used, max), (MESSAGE.len() as u64, 100));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(q.ids().unwrap().len(), 1);
    assert!(names(&q.dir.join("tmp")).is_empty());
}

/// Fails like a full disk after some bytes.
struct DiskFull(usize);

impl Read for DiskFull {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0 == 0 {
            return Err(io::ErrorKind::StorageFull.into());
        }
        let n = self.0.min(buf.len()).min(10);
        buf[..n].fill(b'x');
        self.0 -= n;
        Ok(n)
    }
}

#[test]
fn a_write_that_fails_midway_leaves_no_partial_file() {
    let t = temp_queue("enospc", None);
    let q = &t.queue;
    match q.store(new_message("a@x", &["b@y"]), &mut DiskFull(30), 1000) {
        Err(StoreError::NoSpace(_)) => {}
        other => panic!("{other:?}"),
    }
    // A short message (the spool lost bytes) is refused too, not queued truncated.
    assert!(matches!(
        q.store(new_message("a@x", &["b@y"]), &mut &b"abc"[..], 10),
        Err(StoreError::Io(_))
    ));
    assert_eq!(names(&q.dir), vec!["delivered".to_string(), "tmp".into()]);
    assert!(names(&q.dir.join("tmp")).is_empty());
}

#[test]
fn an_unusable_queue_directory_is_an_io_error_not_a_panic() {
    let t = temp_queue("notadir", None);
    fs::write(&t.queue.dir, b"a file where the directory should be").unwrap();
    let err = t
        .queue
        .store(
            new_message("a@x", &["b@y"]),
            &mut &MESSAGE[..],
            MESSAGE.len() as u64,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Io(_)), "{err:?}");
    assert!(
        err.to_string().contains("cannot write to the queue"),
        "{err}"
    );
    fs::remove_file(&t.queue.dir).unwrap();
}

#[test]
fn backoff_is_1_5_15_30_minutes_then_hourly() {
    let minutes: Vec<u64> = (1..=7).map(|n| backoff(n).as_secs() / 60).collect();
    assert_eq!(minutes, vec![1, 5, 15, 30, 60, 60, 60]);
}

#[test]
fn lifetimes_take_units() {
    use super::admin::lifetime;
    assert_eq!(lifetime("90"), Ok(Duration::from_secs(90)));
    assert_eq!(lifetime("30m"), Ok(Duration::from_secs(1800)));
    assert_eq!(lifetime("5d"), Ok(Duration::from_secs(5 * 86400)));
    for bad in ["", "5w", "-1", "1.5h", "99999999999999999999d"] {
        assert!(lifetime(bad).is_err(), "{bad}");
    }
}

fn stored(q: &Queue, from: &str, to: &[&str]) -> super::Locked {
    q.store(
        new_message(from, to),
        &mut &MESSAGE[..],
        MESSAGE.len() as u64,
    )
    .unwrap()
}

#[test]
fn a_delivered_message_is_tombstoned_then_removed() {
    let t = temp_queue("delivered", None);
    let q = &t.queue;
    let locked = stored(q, "a@x", &["b@y", "c@y"]);
    let id = locked.id().to_string();
    let mut relay = MemoryRelay::default();
    let outcome = deliver::attempt(q, &mut relay, locked, &policy(), false).unwrap();
    assert_eq!(outcome, Outcome::Delivered);
    assert_eq!(relay.delivered.len(), 1);
    assert_eq!(relay.delivered[0].data, MESSAGE);
    assert_eq!(relay.delivered[0].to, vec!["b@y", "c@y"]);
    assert!(q.ids().unwrap().is_empty());
    assert!(q.has_tombstone(&id));
    assert_eq!(names(&q.dir), vec!["delivered".to_string(), "tmp".into()]);
}

#[test]
fn an_unreachable_backend_defers_with_backoff_and_the_error() {
    let t = temp_queue("deferred", None);
    let q = &t.queue;
    let locked = stored(q, "a@x", &["b@y"]);
    let id = locked.id().to_string();
    let mut relay = relay_with(|r| {
        r.down = true;
    });
    let before = store::now_secs();
    let outcome = deliver::attempt(q, &mut relay, locked, &policy(), false).unwrap();
    // No connection at all: `queue run` stops trying the others in this run.
    assert!(matches!(outcome, Outcome::Unreachable(ref e) if e.contains("connection refused")));
    let envelope = q.envelope(&id).unwrap();
    assert_eq!(envelope.attempts, 1);
    assert!((before + 60..=before + 62).contains(&envelope.next_attempt));
    assert!(envelope.last_error.unwrap().contains("connection refused"));
    // The second failure waits five minutes.
    let locked = q.lock(&id).unwrap().unwrap();
    deliver::attempt(q, &mut relay, locked, &policy(), false).unwrap();
    let envelope = q.envelope(&id).unwrap();
    assert_eq!(envelope.attempts, 2);
    assert!(envelope.next_attempt >= before + 300);
    assert!(!q.has_tombstone(&id));
}

#[test]
fn a_refusal_after_data_bounces_a_dsn_to_the_sender_and_the_message_leaves() {
    let t = temp_queue("bounce", None);
    let q = &t.queue;
    let locked = stored(q, "scanner@x", &["b@y"]);
    let id = locked.id().to_string();
    let mut relay = relay_with(|r| {
        r.data_reply = Some(Reply::from_backend(554, &["5.7.1 spam"]));
    });
    let outcome = deliver::attempt(q, &mut relay, locked, &policy(), false).unwrap();
    assert_eq!(outcome, Outcome::Bounced);
    assert!(q.ids().unwrap().is_empty());
    // The refusal stays configured, so the DSN itself is refused: dropped, logged.
    assert!(relay.delivered.is_empty());
    assert!(
        relay.log.iter().any(|l| l == "MAIL FROM:<>"),
        "{:?}",
        relay.log
    );
    assert!(relay.log.iter().any(|l| l == "RCPT TO:<scanner@x>"));
    assert!(q.has_tombstone(&id));
}

#[test]
fn a_refused_recipient_gets_an_rfc3464_report_and_the_others_their_mail() {
    let t = temp_queue("partial", None);
    let q = &t.queue;
    let locked = stored(q, "scanner@x", &["b@y", "nobody@y"]);
    let id = locked.id().to_string();
    let mut relay = relay_with(|r| {
        r.unknown = vec!["nobody@y".into()];
    });
    let outcome = deliver::attempt(q, &mut relay, locked, &policy(), false).unwrap();
    assert_eq!(outcome, Outcome::Bounced);
    assert_eq!(relay.delivered.len(), 2, "{:?}", relay.log);
    assert_eq!(relay.delivered[0].to, vec!["b@y"]);
    let dsn = &relay.delivered[1];
    assert_eq!(
        (dsn.from.as_str(), dsn.to.clone()),
        ("", vec!["scanner@x".into()])
    );
    let text = String::from_utf8(dsn.data.clone()).unwrap();
    for expected in [
        "Content-Type: multipart/report; report-type=delivery-status; boundary=",
        "Content-Type: message/delivery-status\r\n",
        "Reporting-MTA: dns; gw.example\r\n",
        "Final-Recipient: rfc822; nobody@y\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        "Diagnostic-Code: smtp; 550 5.1.1 <nobody@y>: Recipient address rejected",
        "Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\nMessage-ID: <1@x>\r\n\r\n--",
        "Auto-Submitted: auto-replied\r\n",
        &id,
    ] {
        assert!(text.contains(expected), "{expected:?} in\n{text}");
    }
    assert!(
        !text.contains("the body text"),
        "the DSN carries the headers only"
    );
    assert!(text.ends_with("--\r\n"));
    assert!(
        !text.contains("b@y"),
        "only the failed recipient is reported"
    );
}

#[test]
fn a_null_sender_never_gets_a_dsn_but_bounce_to_does() {
    let t = temp_queue("null", None);
    let q = &t.queue;
    let mut relay = relay_with(|r| {
        r.unknown = vec!["nobody@y".into()];
    });
    let locked = stored(q, "", &["nobody@y"]);
    assert_eq!(
        deliver::attempt(q, &mut relay, locked, &policy(), false).unwrap(),
        Outcome::Bounced
    );
    assert!(relay.delivered.is_empty());
    assert!(q.ids().unwrap().is_empty());
    let locked = stored(q, "", &["nobody@y"]);
    let to_admin = Policy {
        bounce_to: Some("postmaster@x".into()),
        ..policy()
    };
    deliver::attempt(q, &mut relay, locked, &to_admin, false).unwrap();
    assert_eq!(relay.delivered.len(), 1);
    assert_eq!(relay.delivered[0].to, vec!["postmaster@x"]);
}

#[test]
fn past_its_lifetime_a_deferred_message_bounces_with_4_4_7() {
    let t = temp_queue("expired", None);
    let q = &t.queue;
    let locked = stored(q, "scanner@x", &["b@y"]);
    let mut relay = relay_with(|r| {
        r.rcpt_replies = vec![("b@y".into(), Reply::from_backend(451, &["4.7.1 try later"]))];
    });
    let short = Policy {
        lifetime: Duration::ZERO,
        ..policy()
    };
    let outcome = deliver::attempt(q, &mut relay, locked, &short, false).unwrap();
    assert_eq!(outcome, Outcome::Bounced);
    let text = String::from_utf8(relay.delivered[0].data.clone()).unwrap();
    assert!(text.contains("Status: 4.4.7\r\n"), "{text}");
    assert!(
        text.contains("delivery time expired; last error: 451 4.7.1 try later"),
        "{text}"
    );
}

#[test]
fn a_deferred_recipient_stays_queued_while_the_accepted_one_is_not_sent_again() {
    let t = temp_queue("split", None);
    let q = &t.queue;
    let locked = stored(q, "a@x", &["b@y", "later@y"]);
    let id = locked.id().to_string();
    let mut relay = relay_with(|r| {
        r.rcpt_replies = vec![(
            "later@y".into(),
            Reply::from_backend(450, &["4.2.0 greylisted"]),
        )];
    });
    let outcome = deliver::attempt(q, &mut relay, locked, &policy(), false).unwrap();
    assert!(matches!(outcome, Outcome::Deferred(_)), "{outcome:?}");
    assert_eq!(relay.delivered[0].to, vec!["b@y"]);
    assert_eq!(q.envelope(&id).unwrap().to, vec!["later@y"]);
    relay.rcpt_replies.clear();
    let locked = q.lock(&id).unwrap().unwrap();
    deliver::attempt(q, &mut relay, locked, &policy(), false).unwrap();
    assert_eq!(relay.delivered[1].to, vec!["later@y"]);
    assert!(q.ids().unwrap().is_empty());
}

#[test]
fn clean_removes_old_tombstones_and_crash_leftovers_only() {
    let t = temp_queue("clean", None);
    let q = &t.queue;
    q.create_dirs().unwrap();
    let long_ago = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    let age = |path: PathBuf| {
        let file = fs::File::create(&path).unwrap();
        file.set_modified(long_ago).unwrap();
    };
    age(q.dir.join("delivered/OLD"));
    fs::File::create(q.dir.join("delivered/NEW")).unwrap();
    age(q.dir.join("tmp/HALF.msg"));
    age(q.dir.join("ORPHAN.msg"));
    let kept = stored(q, "a@x", &["b@y"]);
    assert_eq!(q.clean().unwrap(), 3);
    assert_eq!(names(&q.dir.join("delivered")), vec!["NEW"]);
    assert!(names(&q.dir.join("tmp")).is_empty());
    assert_eq!(q.ids().unwrap(), vec![kept.id().to_string()]);
    assert!(q.dir.join(format!("{}.msg", kept.id())).exists());
}

#[test]
fn the_listing_fits_a_terminal_and_says_held_due_and_the_error() {
    let t = temp_queue("list", None);
    let q = &t.queue;
    let mut locked = stored(q, "a@x", &["b@y"]);
    locked.envelope.attempts = 2;
    locked.envelope.last_error = Some("backend unavailable: connection refused".into());
    let now = locked.envelope.created + 90;
    locked.envelope.next_attempt = now + 240;
    let mut held = locked.envelope.clone();
    held.held = true;
    held.id = "HELD".into();
    let table = super::admin::table(&[locked.envelope.clone(), held], now);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID "), "{table}");
    assert!(lines[1].contains(" 1m ") && lines[1].contains("2") && lines[1].contains(" 4m "));
    assert!(lines[1].ends_with("<a@x> -> <b@y>"), "{table}");
    assert_eq!(lines[2], "    backend unavailable: connection refused");
    assert!(lines[3].contains(" held "), "{table}");
    assert_eq!(lines.last().unwrap(), &"2 message(s)");
    assert!(lines.iter().all(|l| l.len() <= 120), "{table}");
}
