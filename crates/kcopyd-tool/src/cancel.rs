//! A cancellation token: whoever holds a clone may cancel; the runner checks it between
//! steps and cancels its engine job when it fires.
//!
//! ```text
//!  caller (Ctrl-C handler, a timeout, a UI button) ── cancel() ──► Cancel ◄── is_cancelled()
//!                                                                    └──► cancelled().await
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A cancellation token, cheap to clone; every clone sees the same state.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    cancelled: AtomicBool,
    notify: Notify,
}

impl Cancel {
    /// A token not cancelled yet.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Cancels: every waiter wakes, and every later check says so. Cancelling twice is
    /// cancelling once.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Release);
        self.inner.notify.notify_waiters();
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// Completes once the token is cancelled (at once if it is already).
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_cancels_and_waiters_wake() {
        let token = Cancel::new();
        let clone = token.clone();
        assert!(!token.is_cancelled());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let waiter = tokio::spawn({
                let token = token.clone();
                async move { token.cancelled().await }
            });
            tokio::task::yield_now().await;
            clone.cancel();
            waiter.await.unwrap();
        });
        assert!(token.is_cancelled());
        runtime.block_on(token.cancelled());
    }
}
