//! A minimal executor for the blocking API: poll one future on the calling thread, parking
//! between wake-ups. Plain threads use it to wait for admission without an async runtime.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` to completion on this thread.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        // A spurious unpark only costs one more poll.
        thread::park();
    }
}

/// Runs `future` on this thread for at most `timeout`: its output, or `None` if it was not
/// ready in time (the future is dropped then).
pub(crate) fn block_on_timeout<F: Future>(future: F, timeout: Duration) -> Option<F::Output> {
    let Some(deadline) = Instant::now().checked_add(timeout) else {
        return Some(block_on(future));
    };
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Some(output);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::park_timeout(deadline - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_wake_from_another_thread() {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));
        let giver = semaphore.clone();
        let helper = thread::spawn(move || {
            thread::sleep(std::time::Duration::from_millis(20));
            giver.add_permits(1);
        });
        let permit = block_on(semaphore.acquire()).unwrap();
        drop(permit);
        helper.join().unwrap();
    }

    #[test]
    fn gives_up_at_the_deadline_or_returns_what_came_in_time() {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(0));
        assert!(block_on_timeout(semaphore.acquire(), Duration::from_millis(10)).is_none());
        let giver = semaphore.clone();
        let helper = thread::spawn(move || giver.add_permits(1));
        let permit = block_on_timeout(semaphore.acquire(), Duration::from_secs(60)).expect("in time");
        drop(permit.unwrap());
        helper.join().unwrap();
        // A timeout too large for the clock waits like `block_on`.
        assert!(block_on_timeout(semaphore.acquire(), Duration::MAX).is_some());
    }
}
