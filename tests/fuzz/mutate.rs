//! The seeded random source and the byte mutations every target shares.

/// SplitMix64: tiny, fast, and the same sequence on every machine for a given seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn pick_bytes<'a>(&mut self, items: &[&'a [u8]]) -> &'a [u8] {
        items[self.below(items.len())]
    }
}

/// Bytes that change how protocol text is read: line ends, NUL, separators, brackets.
const SPECIAL: &[u8] = b"\r\n\0\xff \t.:<>{}()[]=*+-\"\\@,;~\x7f\x80\x0c0123456789";

/// Numbers at the edges of the integer types the parsers use.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "00000000000000000000001",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999999",
];

/// Applies one to a few random mutations to `data`. `dictionary` holds the target's own
/// words (verbs, items, codes); `others` are other seeds to splice from.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, dictionary: &[&[u8]], others: &[Vec<u8>]) {
    let rounds = if rng.one_in(4) { 1 + rng.below(8) } else { 1 };
    for _ in 0..rounds {
        mutate_once(rng, data, dictionary, others);
    }
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, dictionary: &[&[u8]], others: &[Vec<u8>]) {
    let at = |rng: &mut Rng, data: &Vec<u8>| rng.below(data.len() + 1);
    match rng.below(16) {
        // Flip one bit.
        0 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] ^= 1 << rng.below(8);
        }
        // Replace a byte with any byte.
        1 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] = rng.next() as u8;
        }
        // Insert a special byte (CR, LF, NUL, 0xFF, separators…).
        2 | 3 => {
            let i = at(rng, data);
            data.insert(i, *rng.pick(SPECIAL));
        }
        // Delete a range.
        4 if !data.is_empty() => {
            let i = rng.below(data.len());
            let n = 1 + rng.below((data.len() - i).min(16));
            data.drain(i..i + n);
        }
        // Duplicate a range in place.
        5 if !data.is_empty() => {
            let i = rng.below(data.len());
            let n = 1 + rng.below((data.len() - i).min(64));
            let copy = data[i..i + n].to_vec();
            let j = at(rng, data);
            data.splice(j..j, copy);
        }
        // Insert a dictionary word.
        6 | 7 if !dictionary.is_empty() => {
            let i = at(rng, data);
            let word = rng.pick(dictionary).to_vec();
            data.splice(i..i, word);
        }
        // Splice: the head of this input with the tail of another seed.
        8 if !others.is_empty() => {
            let other = rng.pick(others);
            let i = at(rng, data);
            let j = rng.below(other.len() + 1);
            data.truncate(i);
            data.extend_from_slice(&other[j..]);
        }
        // An overlong run: past every line limit (POP3 2048, SMTP 512/1036/12288, IMAP 64 KiB
        // only rarely, to keep inputs fast).
        9 => {
            let i = at(rng, data);
            let n = if rng.one_in(64) {
                70_000
            } else {
                *rng.pick(&[
                    255, 500, 511, 512, 1000, 1100, 2047, 2048, 2049, 3000, 12_300,
                ])
            };
            let byte = *rng.pick(b"Ax .0\r");
            data.splice(i..i, std::iter::repeat_n(byte, n));
        }
        // Replace a run of digits (or insert) an edge-case number.
        10 | 11 => {
            let number = rng.pick(NUMBERS).as_bytes();
            let starts: Vec<usize> = (0..data.len())
                .filter(|&i| data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_digit()))
                .collect();
            if starts.is_empty() {
                let i = at(rng, data);
                data.splice(i..i, number.iter().copied());
            } else {
                let s = *rng.pick(&starts);
                let e = (s..data.len())
                    .find(|&i| !data[i].is_ascii_digit())
                    .unwrap_or(data.len());
                data.splice(s..e, number.iter().copied());
            }
        }
        // Repeat one line many times (repeated commands, bad-command limits).
        12 => {
            let lines = line_starts(data);
            let s = *rng.pick(&lines);
            let e = data[s..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(data.len(), |p| s + p + 1);
            let line = data[s..e].to_vec();
            let times = 1 + rng.below(30);
            for _ in 0..times {
                data.splice(e..e, line.iter().copied());
            }
        }
        // Swap the case of a range (keywords are case-insensitive; data is not).
        13 if !data.is_empty() => {
            let i = rng.below(data.len());
            let n = 1 + rng.below((data.len() - i).min(12));
            for b in &mut data[i..i + n] {
                if b.is_ascii_alphabetic() {
                    *b ^= 0x20;
                }
            }
        }
        // Truncate.
        14 if !data.is_empty() => {
            let i = rng.below(data.len());
            data.truncate(i);
        }
        // Turn line ends into another kind: CRLF → LF, LF → CRLF, CRLF → CR.
        _ => {
            let lines = line_starts(data);
            let s = *rng.pick(&lines);
            if let Some(p) = data[s..].iter().position(|&b| b == b'\n') {
                let lf = s + p;
                match rng.below(3) {
                    0 if lf > 0 && data[lf - 1] == b'\r' => {
                        data.remove(lf - 1);
                    }
                    1 => data.insert(lf, b'\r'),
                    _ => data[lf] = b'\r',
                }
            }
        }
    }
}

fn line_starts(data: &[u8]) -> Vec<usize> {
    let mut starts = vec![0];
    starts.extend(
        data.iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'\n' && i + 1 < data.len())
            .map(|(i, _)| i + 1),
    );
    starts
}

/// Strict base64 (RFC 4648 §4, padding required, nothing else allowed): the oracle's own
/// decoder, written apart from the proxy's so that a lenient proxy decoder shows up.
/// Non-zero padding bits are accepted, as RFC 4648 §3.5 allows.
pub fn unbase64(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let value = |b: u8| match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::new();
    let quads = text.len() / 4;
    for (q, quad) in text.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &b in &quad[..4 - pad] {
            n = n << 6 | u32::from(value(b)?);
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}
