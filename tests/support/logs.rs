//! A tracing subscriber that records distlock's events, for tests that a log line is
//! written (and written once): level, message and fields, as text.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// One recorded event.
#[derive(Debug, Clone)]
pub struct Line {
    pub level: tracing::Level,
    /// `message` and every field, as `name=value` pairs separated by spaces.
    pub text: String,
}

/// Records every event from distlock's modules while it is the default subscriber.
#[derive(Clone, Default)]
pub struct Capture {
    lines: Arc<Mutex<Vec<Line>>>,
}

impl Capture {
    /// The lines recorded so far at `level` whose text contains `needle`.
    pub fn find(&self, level: tracing::Level, needle: &str) -> Vec<Line> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.level == level && l.text.contains(needle))
            .cloned()
            .collect()
    }
}

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, "{}={} ", field.name(), value);
    }
}

impl Subscriber for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("distlock")
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = String::new();
        event.record(&mut Text(&mut text));
        self.lines.lock().unwrap().push(Line {
            level: *event.metadata().level(),
            text,
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}
