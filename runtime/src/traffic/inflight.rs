//! What an instance still has to finish before it may be signalled: the
//! requests, WebSockets and TCP connections the proxy sent it. The
//! supervisor takes an instance out of rotation, waits until its count is
//! zero (bounded by `kill_timeout`), and only then sends SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// One instance's work in flight.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    emptied: Notify,
}

impl InFlight {
    /// Counts one more piece of work until the guard is dropped.
    pub fn enter(self: &Arc<InFlight>) -> Entered {
        self.count.fetch_add(1, Ordering::AcqRel);
        Entered(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Returns once nothing is in flight.
    pub async fn idle(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            // Registered before the check: a last guard dropped in between
            // still wakes this wait.
            emptied.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

/// A piece of work in flight on an instance; dropping it ends it.
#[derive(Debug)]
pub struct Entered(Arc<InFlight>);

impl Clone for Entered {
    fn clone(&self) -> Entered {
        self.0.enter()
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_returns_at_once_when_nothing_is_in_flight_and_once_the_last_guard_goes() {
        let in_flight = Arc::new(InFlight::default());
        in_flight.idle().await;
        let first = in_flight.enter();
        let second = first.clone();
        assert_eq!(in_flight.count(), 2);
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one guard is still held");
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("idle once the last guard is dropped")
            .unwrap();
        assert_eq!(in_flight.count(), 0);
    }
}
