//! Holding one incoming message with bounded memory until it has been read to its final dot.
//!
//! Why spool instead of streaming straight to the backend: if the client vanished, timed
//! out, or went over the size limit halfway through a message being streamed, the backend
//! would have to be cut off mid-message, and header edits need the whole header block
//! first. Reading the whole message first means the backend only ever sees complete
//! messages (sent as one `BDAT n LAST` when it offers CHUNKING), and an oversized message is
//! rejected without the backend seeing a byte. The cost is disk space for large messages
//! and the time to send them after the dot (RFC 5321 §4.5.3.2.6 gives the client 10
//! minutes for our reply). Meanwhile the backend transaction (MAIL, RCPT) waits; the
//! session keeps it alive with NOOP while a slow client sends.
//!
//! Memory stays bounded: the first [`HEAD_MAX`] bytes (which hold the header block, the
//! only part that may be edited) stay in memory, and everything after them goes to an
//! unlinked temporary file, created only when a message is that large and reused for the
//! session's later messages.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes of each message kept in memory; also the largest header block that can be edited.
pub const HEAD_MAX: usize = 256 * 1024;

const FILE_BUFFER: usize = 64 * 1024;

/// What holds the part of a message past the head: an unlinked file, or in tests a
/// stand-in that fails on cue. `Send`, so that message handlers (`handler.rs`) can stream
/// a spool from a thread of their own.
pub trait Backing: Read + Write + Seek + fmt::Debug + Send {
    /// Empties it (the file is kept for the session's next message).
    fn truncate(&mut self) -> io::Result<()>;
}

impl Backing for File {
    fn truncate(&mut self) -> io::Result<()> {
        self.set_len(0)
    }
}

/// One message being received, or received.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    head_max: usize,
    head: Vec<u8>,
    /// The rest of the message, past `head_max`. Always empty and at its start when a
    /// message begins: after a write error it is dropped, never reused half-written.
    file: Option<BufWriter<Box<dyn Backing>>>,
    file_len: u64,
    size: u64,
    max_size: u64,
    /// The first write error; reported at the final dot, after the data has been read.
    error: Option<io::Error>,
}

impl Spool {
    pub fn new(dir: &Path, max_size: u64) -> Self {
        Self::with_head_max(dir, max_size, HEAD_MAX)
    }

    /// `head_max` is small in tests so that the file path is exercised.
    pub fn with_head_max(dir: &Path, max_size: u64, head_max: usize) -> Self {
        Spool {
            dir: dir.to_path_buf(),
            head_max,
            head: Vec::new(),
            file: None,
            file_len: 0,
            size: 0,
            max_size,
            error: None,
        }
    }

    /// Empties the spool for the next message, keeping the temporary file.
    ///
    /// The file is emptied and rewound every time, whatever happened to the last message:
    /// bytes or a position left over would be sent as part of the next message.
    pub fn clear(&mut self) {
        self.head.clear();
        self.head.shrink_to(64 * 1024);
        self.size = 0;
        self.error = None;
        self.file_len = 0;
        if let Some(file) = self.file.take() {
            // Bytes still buffered belong to the last message: dropped, not written.
            let (mut inner, _) = file.into_parts();
            if inner.truncate().and_then(|_| inner.rewind()).is_ok() {
                self.file = Some(BufWriter::with_capacity(FILE_BUFFER, inner));
            }
        }
    }

    /// Message bytes seen so far, counted even past the limit (RFC 1870 §3 sizes).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn oversized(&self) -> bool {
        self.size > self.max_size
    }

    /// Adds decoded message bytes. Past the size limit they are counted and dropped.
    pub fn write(&mut self, mut bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.oversized() || self.error.is_some() {
            return;
        }
        let room = self.head_max - self.head.len();
        let now = room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..now]);
        bytes = &bytes[now..];
        if bytes.is_empty() {
            return;
        }
        if let Err(e) = self.file_write(bytes) {
            self.error = Some(e);
            // Whatever part of the write reached the file is unknown: the file goes, and
            // the next large message gets a new one.
            if let Some(file) = self.file.take() {
                drop(file.into_parts());
            }
            self.file_len = 0;
        }
    }

    fn file_write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            let file: Box<dyn Backing> = Box::new(unlinked_file(&self.dir)?);
            self.file = Some(BufWriter::with_capacity(FILE_BUFFER, file));
        }
        let file = self.file.as_mut().expect("just created");
        file.write_all(bytes)?;
        self.file_len += bytes.len() as u64;
        Ok(())
    }

    /// The first `head_max` bytes of the message.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Whether the whole message is in [`Spool::head`].
    pub fn complete_in_head(&self) -> bool {
        self.file_len == 0
    }

    /// Hands back a write error that happened while receiving.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// A reader over the bytes after the head, from their start. Call once per message.
    pub fn tail(&mut self) -> io::Result<(Box<dyn Read + '_>, u64)> {
        let len = self.file_len;
        match &mut self.file {
            Some(file) if len > 0 => {
                file.flush()?;
                let f = file.get_mut();
                f.seek(SeekFrom::Start(0))?;
                Ok((
                    Box::new(io::BufReader::with_capacity(FILE_BUFFER, f).take(len)),
                    len,
                ))
            }
            _ => Ok((Box::new(io::empty()), 0)),
        }
    }
}

/// Creates a file only this process can reach: `O_EXCL`, mode 0600, unlinked at once, so it
/// disappears when the process ends however it ends.
fn unlinked_file(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let path = dir.join(format!(
            ".legacy-mail-proxy-{}-{nanos:x}-{attempt}",
            std::process::id()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create a spool file in {}: {e}", dir.display()),
                ));
            }
        }
    }
    Err(io::Error::other(format!(
        "cannot create a unique spool file in {}",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(spool: &mut Spool) -> Vec<u8> {
        let mut all = spool.head().to_vec();
        let (mut tail, len) = spool.tail().unwrap();
        let before = all.len();
        tail.read_to_end(&mut all).unwrap();
        assert_eq!((all.len() - before) as u64, len);
        all
    }

    #[test]
    fn small_messages_stay_in_memory_and_large_ones_spill_to_an_unlinked_file() {
        let dir = std::env::temp_dir();
        let mut spool = Spool::with_head_max(&dir, 1000, 10);
        spool.write(b"12345");
        assert!(spool.complete_in_head());
        assert_eq!(read_all(&mut spool), b"12345");
        spool.clear();
        for chunk in b"0123456789abcdefghij".chunks(3) {
            spool.write(chunk);
        }
        assert!(!spool.complete_in_head());
        assert_eq!(spool.head(), b"0123456789");
        assert_eq!(read_all(&mut spool), b"0123456789abcdefghij");
        // The file is reused and truncated for the next message.
        spool.clear();
        spool.write(b"0123456789XY");
        assert_eq!(read_all(&mut spool), b"0123456789XY");
    }

    #[test]
    fn bytes_past_the_limit_are_counted_not_kept() {
        let mut spool = Spool::with_head_max(&std::env::temp_dir(), 8, 4);
        spool.write(b"12345678");
        assert!(!spool.oversized());
        spool.write(b"9");
        assert!(spool.oversized());
        spool.write(&[b'x'; 100]);
        assert_eq!(spool.size(), 109);
    }

    /// A disk that fills up: writes fail once `room` bytes are in, until it is emptied.
    #[derive(Debug, Default)]
    struct FillingDisk {
        data: io::Cursor<Vec<u8>>,
        room: usize,
    }

    impl Read for FillingDisk {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.data.read(buf)
        }
    }

    impl Write for FillingDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let used = self.data.get_ref().len();
            if used >= self.room {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.room - used);
            self.data.write(&buf[..n])
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Seek for FillingDisk {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.data.seek(pos)
        }
    }

    impl Backing for FillingDisk {
        fn truncate(&mut self) -> io::Result<()> {
            self.data.get_mut().clear();
            self.room = usize::MAX; // space was freed
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_never_leaks_bytes_into_the_next_message() {
        let mut spool = Spool::with_head_max(&std::env::temp_dir(), 1 << 30, 4);
        let disk = FillingDisk {
            room: 50_000,
            ..FillingDisk::default()
        };
        spool.file = Some(BufWriter::with_capacity(FILE_BUFFER, Box::new(disk)));
        // One write larger than the buffer goes straight to the disk and fails part-way.
        spool.write(b"head");
        spool.write(&[b'A'; 100_000]);
        assert!(spool.take_error().is_some());
        spool.clear();
        spool.write(b"headBBBBBB");
        assert!(spool.take_error().is_none());
        assert_eq!(read_all(&mut spool), b"headBBBBBB");
        // The same after a failure once some of the message was already in the file.
        let disk = FillingDisk {
            room: 100_000,
            ..FillingDisk::default()
        };
        spool.clear();
        spool.file = Some(BufWriter::with_capacity(FILE_BUFFER, Box::new(disk)));
        spool.write(b"head");
        for _ in 0..300 {
            spool.write(&[b'A'; 1000]);
        }
        assert!(spool.take_error().is_some());
        spool.clear();
        spool.write(b"headCC");
        assert_eq!(read_all(&mut spool), b"headCC");
    }

    #[test]
    fn an_unusable_spool_directory_is_reported_not_fatal() {
        let mut spool = Spool::with_head_max(Path::new("/nonexistent/dir"), 100, 4);
        spool.write(b"123456");
        let e = spool.take_error().unwrap();
        assert!(e.to_string().contains("/nonexistent/dir"), "{e}");
    }
}
