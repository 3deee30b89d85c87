//! The benchmark's messages, generated deterministically (the same bytes on every run):
//! plain-text messages of given sizes and MIME messages with a base64 attachment. Lines end
//! in CRLF and are at most 78 octets; some text lines start with "." so dot-stuffing is
//! exercised on every path.

/// xorshift64*: fast, deterministic, good enough to make incompressible test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    /// Uniform in 0..1.
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "mail",
    "proxy",
    "legacy",
    "device",
    "scanner",
    "report",
    "invoice",
    "meeting",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "server",
    "message",
    "attached",
    "please",
    "find",
    "below",
    "regards",
    "monday",
    "quarterly",
    "numbers",
    "gateway",
    "über",
    "café",
    "naïve",
];

fn headers(id: &str, subject: &str, content_type: &str) -> Vec<u8> {
    format!(
        "From: Bench Sender <sender@example.test>\r\n\
         To: Bench Recipient <recipient@example.test>\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n\
         Message-ID: <{id}@bench.example.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: {content_type}\r\n\r\n"
    )
    .into_bytes()
}

/// A text/plain message of about `size` octets (never less).
pub fn text(rng: &mut Rng, id: &str, size: usize) -> Vec<u8> {
    let mut m = headers(id, &format!("text {id}"), "text/plain; charset=utf-8");
    m.reserve(size.saturating_sub(m.len()) + 80);
    while m.len() < size {
        let start = m.len();
        if rng.next().is_multiple_of(40) {
            m.push(b'.');
        }
        while m.len() - start < 64 {
            m.extend_from_slice(WORDS[rng.range(0, WORDS.len() - 1)].as_bytes());
            m.push(b' ');
        }
        m.extend_from_slice(b"\r\n");
    }
    m
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// A multipart message whose attachment is base64 (76-octet lines) of random bytes,
/// about `size` octets in all.
pub fn attachment(rng: &mut Rng, id: &str, size: usize) -> Vec<u8> {
    let mut m = headers(
        id,
        &format!("attachment {id}"),
        "multipart/mixed; boundary=\"=-bench-=\"",
    );
    m.extend_from_slice(
        b"--=-bench-=\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n\
          --=-bench-=\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n\
          Content-Transfer-Encoding: base64\r\n\r\n",
    );
    m.reserve(size.saturating_sub(m.len()) + 100);
    let end = b"--=-bench-=--\r\n";
    while m.len() + end.len() < size {
        for _ in 0..76 / 4 {
            let r = rng.next();
            for k in 0..4 {
                m.push(BASE64[(r >> (6 * k)) as usize & 63]);
            }
        }
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(end);
    m
}

/// The "download everything" mailbox: `n` messages of mixed sizes, about 50 KiB on average
/// (2,000 of them are about 100 MB): 70 % text of 1–10 KiB, 25 % of 10–100 KiB (half of
/// them with attachments), 5 % attachments of 300 KiB–1 MiB. Calls `each` with every
/// message so that nothing needs to stay in memory.
pub fn mixed(n: usize, mut each: impl FnMut(&[u8])) {
    let mut rng = Rng::new(1);
    for i in 0..n {
        let id = format!("mixed-{i}");
        let p = rng.unit();
        let m = if p < 0.70 {
            let size = rng.range(1 << 10, 10 << 10);
            text(&mut rng, &id, size)
        } else if p < 0.95 {
            let size = rng.range(10 << 10, 100 << 10);
            if rng.next().is_multiple_of(2) {
                text(&mut rng, &id, size)
            } else {
                attachment(&mut rng, &id, size)
            }
        } else {
            let size = rng.range(300 << 10, 1 << 20);
            attachment(&mut rng, &id, size)
        };
        each(&m);
    }
}

/// SMTP DATA for a message: dot-stuffed, ending in CRLF "." CRLF (`message` ends in CRLF).
pub fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 500 + 8);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}
