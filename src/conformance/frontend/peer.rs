//! The back-end's side of one connection with the front-end under test: requests read within
//! the patience, replies sent, and what the front-end did told in words for the report.

use std::cell::RefCell;
use std::fmt;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::conformance::wire::{self, u16_at, u32_at, Conn, ReadEnd, Reply};
use crate::conformance::{Checked, Failure};

/// A request as the front-end sent it. Its fds were closed as it was read: the kit keeps none.
#[derive(Clone, Debug)]
pub struct Request {
    pub code: u32,
    pub payload: Vec<u8>,
}

impl Request {
    /// The `u64` of a `SET_FEATURES` payload.
    pub fn features(&self) -> u64 {
        wire::u64_at(&self.payload, 0).unwrap_or(0)
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", wire::request_name(self.code))?;
        match self.code {
            wire::SET_FEATURES => write!(f, " (features {:#x})", self.features()),
            wire::OPS_RESULT => match OpsResult::parse(&self.payload) {
                Ok(r) => write!(
                    f,
                    " (transaction {}, {} results)",
                    r.transaction,
                    r.results.len()
                ),
                Err(_) => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

/// One result record of an `OPS_RESULT` (§6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpResult {
    pub kind: u16,
    pub status: i32,
    pub out: [u64; 4],
}

/// An `OPS_RESULT` payload (§7.10), checked against its layout.
#[derive(Clone, Debug)]
pub struct OpsResult {
    pub transaction: u32,
    pub results: Vec<OpResult>,
}

impl OpsResult {
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        let transaction = u32_at(payload, 0).ok_or("an OPS_RESULT shorter than 8 bytes")?;
        let count = u32_at(payload, 4).unwrap_or(0) as usize;
        if !(1..=wire::MAX_OPS).contains(&count) || payload.len() != 8 + wire::OP_SIZE * count {
            return Err(format!(
                "an OPS_RESULT of {} bytes with count {count}; §7.10 needs 8 + 40 × count, count 1..=512",
                payload.len()
            ));
        }
        let results = payload[8..]
            .chunks(wire::OP_SIZE)
            .map(|r| OpResult {
                kind: u16_at(r, 0).unwrap_or(0),
                status: u32_at(r, 4).unwrap_or(0) as i32,
                out: [8, 16, 24, 32].map(|at| wire::u64_at(r, at).unwrap_or(0)),
            })
            .collect();
        Ok(Self {
            transaction,
            results,
        })
    }
}

/// Whether `size` payload bytes fit the layout of request `code` (§7.12).
fn layout_fits(code: u32, size: usize) -> bool {
    match code {
        wire::GET_FEATURES => size == 0,
        wire::MEM_ADD | wire::MEM_REMOVE => size == 40,
        wire::GROUP_ADD | wire::WINDOW_RESET | wire::GROUP_ADOPT => size == 16,
        wire::TABLE_ADD | wire::EEH_OP => size == 32,
        // SHARED 24, INLINE 24 + 8 × count, STUFF 32.
        wire::TCE_UPDATE => (24..=24 + 8 * 512).contains(&size) && size % 8 == 0,
        wire::OPS_RESULT => size >= 8 + wire::OP_SIZE && (size - 8) % wire::OP_SIZE == 0,
        wire::SET_FEATURES
        | wire::GET_STATUS
        | wire::GROUP_REMOVE
        | wire::TABLE_REMOVE
        | wire::WINDOW_QUERY
        | wire::WINDOW_CREATE
        | wire::WINDOW_REMOVE
        | wire::WINDOW_ADOPT => size == 8,
        _ => false,
    }
}

/// What the front-end did next.
pub enum Event {
    Request(Request),
    /// It closed the connection (or reset it) between frames.
    Closed,
    /// Nothing came within the patience.
    Silent,
    /// It sent something that is not a well-formed request: what.
    Broken(String),
}

/// One connection, played as a back-end. Every wait is bounded by the patience.
pub struct Peer {
    conn: Conn,
    patience: Duration,
    /// `endless-transaction`: the rounds a front-end may answer.
    pub max_rounds: u32,
    /// When the last message went either way, and which it was, for "N ms after ...".
    last: RefCell<(Instant, String)>,
    /// What the front-end did, when the case passes.
    note: RefCell<Option<String>>,
}

impl Peer {
    pub fn new(stream: UnixStream, patience: Duration, max_rounds: u32) -> Result<Self, String> {
        Ok(Self {
            conn: Conn::new(stream, patience)?,
            patience,
            max_rounds,
            last: RefCell::new((Instant::now(), "it connected".to_owned())),
            note: RefCell::new(None),
        })
    }

    /// Says what the front-end did, for the report of a case that passes.
    pub fn note(&self, text: String) {
        *self.note.borrow_mut() = Some(text);
    }

    pub fn take_note(&self) -> Option<String> {
        self.note.borrow_mut().take()
    }

    fn mark(&self, what: String) {
        *self.last.borrow_mut() = (Instant::now(), what);
    }

    /// "N ms after the reply": since the last message either way.
    fn since(&self) -> String {
        let last = self.last.borrow();
        format!("{} ms after {}", last.0.elapsed().as_millis(), last.1)
    }

    /// The next thing the front-end does within the patience, and when ("N ms after ...").
    pub fn next(&self) -> (Event, String) {
        let read = self.conn.read_frame(self.patience);
        let after = self.since();
        let frame = match read {
            Ok(frame) => frame,
            Err(ReadEnd::Closed) => return (Event::Closed, after),
            Err(ReadEnd::Timeout) => return (Event::Silent, after),
            Err(end) => return (Event::Broken(end.to_string()), after),
        };
        // The frame's fds close as it goes out of scope: the kit keeps none.
        let (code, flags, size) = (frame.code(), frame.flags(), frame.payload.len());
        if flags != wire::VERSION_1 {
            let why = format!("a frame with header flags {flags:#x}, not a request's (§2)");
            return (Event::Broken(why), after);
        }
        if !layout_fits(code, size) {
            let why = format!(
                "{} with a payload of {size} bytes, which its layout does not allow (§7.12)",
                wire::request_name(code)
            );
            return (Event::Broken(why), after);
        }
        self.mark(format!("its {}", wire::request_name(code)));
        let payload = frame.payload;
        (Event::Request(Request { code, payload }), after)
    }

    /// The next request, which the case needs to go on: anything else fails it.
    pub fn request(&self, wanted: &str) -> Result<Request, Failure> {
        match self.next() {
            (Event::Request(request), _) => Ok(request),
            (other, after) => Err(self.failure(other, &after, wanted)),
        }
    }

    /// Why `event`, which came `after` something, fails a case that waited for `wanted`.
    pub fn failure(&self, event: Event, after: &str, wanted: &str) -> Failure {
        let why = match event {
            Event::Request(request) => {
                format!("the front-end sent {request} {after} instead of {wanted}")
            }
            Event::Closed => {
                format!("the front-end closed the connection {after} instead of sending {wanted}")
            }
            Event::Silent => self.still_connected(&format!(", without sending {wanted}")),
            Event::Broken(what) => format!("the front-end sent {what} instead of {wanted}"),
        };
        Failure::Fail(why)
    }

    /// The next request, which must be `code` (why: the rule that says so).
    pub fn expect(&self, code: u32, why: &str) -> Result<Request, Failure> {
        let name = wire::request_name(code);
        let request = self.request(&name)?;
        if request.code != code {
            return Err(
                format!("the front-end sent {request} where {name} was due ({why})").into(),
            );
        }
        Ok(request)
    }

    /// The first request of a session, which is `GET_FEATURES` (§4.2).
    pub fn first_request(&self) -> Result<Request, Failure> {
        self.expect(wire::GET_FEATURES, "a session begins with it, §4.2")
    }

    /// "still connected after N ms", and what else there is to say.
    pub fn still_connected(&self, more: &str) -> String {
        format!(
            "still connected after {} ms{more}",
            self.patience.as_millis()
        )
    }

    /// Sends bytes the case made (`what`, for messages).
    pub fn send(&self, bytes: &[u8], what: &str) -> Result<(), Failure> {
        self.mark(what.to_owned());
        self.conn
            .send(bytes)
            .map_err(|e| Failure::Fail(format!("cannot send {what}: {e}")))
    }

    pub fn reply(&self, reply: &Reply) -> Result<(), Failure> {
        self.send(&reply.encode(), "the reply")
    }

    /// Sends a reply the front-end must refuse. It may close as soon as it has read enough to
    /// refuse it, so a failed write only means that it closed early.
    pub fn send_bad(&self, bytes: &[u8]) {
        let _ = self.send(bytes, "the reply");
    }

    /// Ends the stream where it is, inside a frame: the front-end reads what was sent, then EOF.
    pub fn shut_down_writes(&self) {
        let _ = self.conn.stream.shutdown(Shutdown::Write);
    }

    /// Passes if the front-end closes the connection within the patience without sending
    /// anything more: it ended the session (§1.2, §9).
    pub fn closes_without_request(&self) -> Checked {
        let (event, after) = self.next();
        let why = match event {
            Event::Closed => {
                self.note(format!(
                    "the front-end closed the connection {after}, without another request"
                ));
                return Ok(());
            }
            Event::Request(request) => format!(
                "the front-end went on: it sent {request} {after}, instead of closing the connection"
            ),
            Event::Silent => self.still_connected(""),
            Event::Broken(what) => {
                format!("the front-end sent {what} instead of closing the connection")
            }
        };
        Err(why.into())
    }
}
