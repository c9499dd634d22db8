//! The sidecar's log events, captured in-process: for a test whose only observable signal is
//! that something ran (the file watch found its own write). Install with [`capture`] in a
//! `current_thread` test, so every task of the harness logs to it.

use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// One event: its target (the module), level, message and other fields as `name=value`.
#[derive(Debug, Clone)]
pub struct Event {
    pub target: String,
    pub level: tracing::Level,
    pub message: String,
    pub fields: Vec<String>,
}

#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<Event>>>);

impl Events {
    pub fn all(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    /// The events from `target` whose message is `message`.
    pub fn matching(&self, target: &str, message: &str) -> Vec<Event> {
        self.all()
            .into_iter()
            .filter(|e| e.target == target && e.message == message)
            .collect()
    }
}

/// Captures every event (all levels) on this thread until the guard is dropped.
pub fn capture() -> (Events, tracing::subscriber::DefaultGuard) {
    let events = Events::default();
    let subscriber = tracing_subscriber::registry().with(Capture(events.clone()));
    (events, tracing::subscriber::set_default(subscriber))
}

struct Capture(Events);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let meta = event.metadata();
        self.0.0.lock().unwrap().push(Event {
            target: meta.target().to_owned(),
            level: *meta.level(),
            message: visitor.message,
            fields: visitor.fields,
        });
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push(format!("{}={value:?}", field.name()));
        }
    }
}
