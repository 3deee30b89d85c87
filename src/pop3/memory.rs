//! An in-memory maildrop for transcript tests, with switches to make it fail the ways a
//! real backend fails.

use super::encode::normalized_size;
use super::maildrop::{
    BackendError, Credentials, Extent, FetchError, Maildrop, MessageInfo, MessageSink, OpenError,
    Opener, Update,
};
use std::cell::RefCell;
use std::rc::Rc;

/// What the backend did, shared with the test after the session consumed the opener.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Journal {
    pub logins: Vec<String>,
    pub deleted: Vec<usize>,
    pub marked_seen: Vec<usize>,
    pub keepalives: usize,
    pub closed: bool,
}

/// Opens [`MemoryMaildrop`]s for one user.
pub struct MemoryOpener {
    pub user: String,
    pub password: String,
    pub messages: Vec<Vec<u8>>,
    /// The backend delivers messages in pieces of this size.
    pub chunk: usize,
    /// Fail `open` with this instead of checking the password.
    pub open_error: Option<fn() -> OpenError>,
    /// Messages (0-based) that were expunged by another client after the snapshot.
    pub gone: Vec<usize>,
    /// Fetches die after this many bytes of a message.
    pub die_after: Option<usize>,
    /// Why DELE cannot work, if it cannot.
    pub cannot_delete: Option<String>,
    /// QUIT's delete fails.
    pub delete_fails: bool,
    /// The delete policy is `keep`.
    pub keeps_everything: bool,
    pub journal: Rc<RefCell<Journal>>,
}

impl MemoryOpener {
    pub fn new(user: &str, password: &str, messages: Vec<Vec<u8>>) -> Self {
        MemoryOpener {
            user: user.into(),
            password: password.into(),
            messages,
            chunk: 7,
            open_error: None,
            gone: Vec::new(),
            die_after: None,
            cannot_delete: None,
            delete_fails: false,
            keeps_everything: false,
            journal: Rc::default(),
        }
    }
}

impl Opener for MemoryOpener {
    fn open(&mut self, credentials: &Credentials) -> Result<Box<dyn Maildrop>, OpenError> {
        if let Some(error) = self.open_error {
            return Err(error());
        }
        if credentials.user != self.user || credentials.password != self.password {
            return Err(OpenError::Auth("wrong password".into()));
        }
        self.journal
            .borrow_mut()
            .logins
            .push(credentials.user.to_string());
        let infos = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| MessageInfo {
                size: normalized_size(m),
                uidl: format!("{:08x}{:08x}", i + 1, 1234),
            })
            .collect();
        Ok(Box::new(MemoryMaildrop {
            messages: self.messages.clone(),
            infos,
            chunk: self.chunk,
            gone: self.gone.clone(),
            die_after: self.die_after,
            cannot_delete: self.cannot_delete.clone(),
            delete_fails: self.delete_fails,
            keeps_everything: self.keeps_everything,
            journal: self.journal.clone(),
        }))
    }
}

pub struct MemoryMaildrop {
    messages: Vec<Vec<u8>>,
    infos: Vec<MessageInfo>,
    chunk: usize,
    gone: Vec<usize>,
    die_after: Option<usize>,
    cannot_delete: Option<String>,
    delete_fails: bool,
    keeps_everything: bool,
    journal: Rc<RefCell<Journal>>,
}

impl Maildrop for MemoryMaildrop {
    fn messages(&self) -> &[MessageInfo] {
        &self.infos
    }

    fn fetch(
        &mut self,
        index: usize,
        _extent: Extent,
        sink: &mut dyn MessageSink,
    ) -> Result<(), FetchError> {
        if self.gone.contains(&index) {
            return Err(FetchError::Gone);
        }
        let message = &self.messages[index];
        let available = self
            .die_after
            .map_or(message.len(), |n| n.min(message.len()));
        sink.start().map_err(FetchError::Client)?;
        for piece in message[..available].chunks(self.chunk.max(1)) {
            if !sink.data(piece).map_err(FetchError::Client)? {
                return Ok(());
            }
        }
        if available < message.len() {
            return Err(FetchError::Backend(BackendError(
                "connection reset by backend".into(),
            )));
        }
        Ok(())
    }

    fn mark_retrieved(&mut self, index: usize) -> Result<(), BackendError> {
        self.journal.borrow_mut().marked_seen.push(index);
        Ok(())
    }

    fn check_delete(&self) -> Result<(), String> {
        match &self.cannot_delete {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    fn keepalive(&mut self) -> Result<(), BackendError> {
        self.journal.borrow_mut().keepalives += 1;
        Ok(())
    }

    fn delete(&mut self, indexes: &[usize]) -> Result<Update, BackendError> {
        if self.delete_fails {
            return Err(BackendError("UID EXPUNGE failed".into()));
        }
        if self.keeps_everything {
            return Ok(Update::Kept);
        }
        self.journal.borrow_mut().deleted.extend_from_slice(indexes);
        Ok(Update::Applied)
    }

    fn close(&mut self) {
        self.journal.borrow_mut().closed = true;
    }
}
