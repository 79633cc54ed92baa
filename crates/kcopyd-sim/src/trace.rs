//! The ordered event trace of a simulation, with a stable hash.
//!
//! Every simulated disk given a [`Trace`] records each completed request; the harness adds
//! its own events (job completions). In a single-threaded run under paused tokio time the
//! order is a function of the seed alone, so the hash identifies the run.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::time::Instant;

use crate::mix64;
use crate::simulation::to_model;

/// One event of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// Position in the trace: orders events with equal timestamps.
    pub sequence: u64,
    /// Model time since the trace began, in nanoseconds.
    pub at_ns: u64,
    /// What happened, as stable text (`"disk0 read 0..16 ok"`).
    pub what: String,
}

/// A shared, append-only event trace. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Trace {
    inner: Arc<Mutex<TraceInner>>,
}

#[derive(Debug)]
struct TraceInner {
    began: Instant,
    events: Vec<TraceEvent>,
    hash: u64,
}

impl Trace {
    /// An empty trace starting now.
    pub fn new() -> Trace {
        Trace { inner: Arc::new(Mutex::new(TraceInner { began: Instant::now(), events: Vec::new(), hash: 0 })) }
    }

    /// Appends an event.
    pub fn record(&self, what: impl Into<String>) {
        let mut inner = self.inner.lock().expect("trace lock");
        let at_ns = to_model(Instant::now().saturating_duration_since(inner.began)).as_nanos() as u64;
        let sequence = inner.events.len() as u64;
        let what = what.into();
        let mut line = String::new();
        let _ = write!(line, "{sequence} {at_ns} {what}");
        inner.hash = line.bytes().fold(mix64(inner.hash), |h, b| mix64(h ^ u64::from(b)));
        inner.events.push(TraceEvent { sequence, at_ns, what });
    }

    /// The events so far.
    pub fn events(&self) -> Vec<TraceEvent> {
        self.inner.lock().expect("trace lock").events.clone()
    }

    /// Number of events so far.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("trace lock").events.len()
    }

    /// Whether the trace is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A stable hash of every event (sequence, time and text), in order.
    pub fn hash(&self) -> u64 {
        self.inner.lock().expect("trace lock").hash
    }
}

impl Default for Trace {
    fn default() -> Trace {
        Trace::new()
    }
}
