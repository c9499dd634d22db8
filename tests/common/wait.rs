//! Waiting for an event: poll what can be observed, with one generous overall bound, never a
//! fixed sleep that hopes the event has happened by then.

use std::future::Future;
use std::time::{Duration, Instant};

/// The bound of [`eventually`]: far beyond what a loaded 2-core machine needs.
pub const LIMIT: Duration = Duration::from_secs(20);

/// Polls `until` every 20 ms until it holds; fails the test naming `what` after [`LIMIT`].
/// Returns how long it took.
pub async fn eventually<F, Fut>(what: &str, mut until: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !until().await {
        assert!(
            started.elapsed() < LIMIT,
            "timed out after {LIMIT:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// [`eventually`] for a condition that is read at once (a counter, a flag).
pub async fn until(what: &str, mut holds: impl FnMut() -> bool) -> Duration {
    eventually(what, || std::future::ready(holds())).await
}
