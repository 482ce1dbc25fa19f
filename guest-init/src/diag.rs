//! init's own diagnostics: a minimal `tracing` subscriber writing `hearth-init[LEVEL]: message
//! key=value…` lines to stderr (the console in a microVM).
//!
//! A full formatting subscriber would cost a large share of the 3 MiB size budget; init's
//! diagnostics need no spans, filters or timestamps (the agent timestamps what it stores).

use std::{
    fmt::Write as _,
    io::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

use tracing::{
    Event, Level, Metadata, Subscriber,
    field::{Field, Visit},
    span,
};

struct Line(String);

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

/// Writes events at `max` and more severe to stderr.
pub struct Console {
    max: Level,
    next_id: AtomicU64,
}

impl Console {
    /// A subscriber for events up to `max` verbosity.
    pub fn new(max: Level) -> Self {
        Self {
            max,
            next_id: AtomicU64::new(1),
        }
    }

    /// Installs it as the global subscriber.
    pub fn install(max: Level) {
        // Fails only if one is installed already (a test); keep that one.
        let _ = tracing::subscriber::set_global_default(Self::new(max));
    }
}

impl Subscriber for Console {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max && metadata.target().starts_with("hearth_init")
    }

    fn new_span(&self, _span: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _span: &span::Id, _values: &span::Record<'_>) {}

    fn record_follows_from(&self, _span: &span::Id, _follows: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line(format!("hearth-init[{}]:", event.metadata().level()));
        event.record(&mut line);
        line.0.push('\n');
        // Nowhere to report a failed write of a diagnostic.
        let _ = std::io::stderr().lock().write_all(line.0.as_bytes());
    }

    fn enter(&self, _span: &span::Id) {}

    fn exit(&self, _span: &span::Id) {}
}
