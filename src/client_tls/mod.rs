//! TLS toward the client: POP3 `STLS` (RFC 2595 §4), SMTP `STARTTLS` (RFC 3207) and
//! implicit TLS (POP3S 995, SMTPS 465, RFC 8314).
//!
//! The protocol cores see only [`StartTls`]: whether TLS is on, whether logins need it,
//! and "start it now". The front end ([`server`]) owns the client's stream, runs the
//! OpenSSL handshake and, before it, throws away every byte the client sent after the
//! STLS/STARTTLS line (the CVE-2011-0411 command-injection class): commands pipelined in
//! clear text must never be read as if they had come through TLS.

pub mod make_cert;
pub mod server;
#[cfg(test)]
pub mod testing;

/// What a protocol core may ask of the client connection's TLS.
pub trait StartTls {
    /// STLS/STARTTLS is available on this connection (configured, and not yet on).
    fn offered(&self) -> bool;
    /// The connection is encrypted (implicit TLS, or after a successful upgrade).
    fn active(&self) -> bool;
    /// Logins (and SMTP mail) are refused until the connection is encrypted.
    fn required(&self) -> bool;
    /// Runs the server side of the handshake. Everything the client sent before it and the
    /// session has not read yet is discarded. The caller has already flushed its "go ahead"
    /// reply. `Err` carries the reason (already logged); the session must end.
    fn start(&mut self) -> Result<(), String>;
}

/// A connection without client TLS: nothing offered, nothing required.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTls;

impl StartTls for NoTls {
    fn offered(&self) -> bool {
        false
    }
    fn active(&self) -> bool {
        false
    }
    fn required(&self) -> bool {
        false
    }
    fn start(&mut self) -> Result<(), String> {
        Err("client TLS is not configured".into())
    }
}

/// Whether a login may go ahead: refused when TLS is required and not yet on.
pub fn login_allowed(tls: &dyn StartTls) -> bool {
    tls.active() || !tls.required()
}

/// Lets a session borrow the front end's TLS (and tests keep theirs to inspect).
impl<T: StartTls + ?Sized> StartTls for &mut T {
    fn offered(&self) -> bool {
        (**self).offered()
    }
    fn active(&self) -> bool {
        (**self).active()
    }
    fn required(&self) -> bool {
        (**self).required()
    }
    fn start(&mut self) -> Result<(), String> {
        (**self).start()
    }
}

/// Lets the front end keep the TLS to itself while a session uses it (SMTP sends the
/// close_notify from the session's "client done" hook).
impl<T: StartTls> StartTls for &std::cell::RefCell<T> {
    fn offered(&self) -> bool {
        self.borrow().offered()
    }
    fn active(&self) -> bool {
        self.borrow().active()
    }
    fn required(&self) -> bool {
        self.borrow().required()
    }
    fn start(&mut self) -> Result<(), String> {
        self.borrow_mut().start()
    }
}

/// `Read` for a reader whose buffer is the truth (bytes may be dropped from it on upgrade).
fn read_through_buffer(
    reader: &mut impl std::io::BufRead,
    out: &mut [u8],
) -> std::io::Result<usize> {
    let available = reader.fill_buf()?;
    let n = available.len().min(out.len());
    out[..n].copy_from_slice(&available[..n]);
    reader.consume(n);
    Ok(n)
}
