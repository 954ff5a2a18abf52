//! A panic caught where it happens, so that it fails one message or one part, never the process.
//!
//! A task that panics unwinds to its `JoinHandle`, and from there the caller cannot tell which
//! part it was or what the message in hand was. [`caught`] turns the panic into a value at the
//! boundary that knows both: the worker loop requeues the job, the refresh-request shell counts
//! the failure, and `App::run` names the part.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;

/// A panic, as the text it was raised with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Panic(pub String);

impl std::fmt::Display for Panic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs `future` to its end, returning its output, or the panic it raised.
///
/// Unwind safety is asserted: the futures given here own or share (behind locks and atomics)
/// everything they touch, and whoever catches the panic drops the future's state at once.
///
/// Not an `async fn`: one would keep `future` twice in its state, as its argument and inside
/// the awaited `CatchUnwind` (rustc lays both out side by side), which doubled every job's task
/// (14 KB to 28 KB, measured with `-Zprint-type-sizes`). Combinators hold it once.
pub(crate) fn caught<F: Future>(future: F) -> impl Future<Output = Result<F::Output, Panic>> {
    AssertUnwindSafe(future).catch_unwind().map(|caught| caught.map_err(|payload| Panic(message(payload.as_ref()))))
}

/// The text of a panic payload: `panic!` gives a `&str` or a `String`; anything else is unnamed.
fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_its_message_and_a_value_passes_through() {
        assert_eq!(caught(async { 7 }).await, Ok(7));
        let formatted = caught(async { panic!("odd {}", 42) }).await;
        assert_eq!(formatted, Err::<(), _>(Panic("odd 42".into())));
        let literal = caught(async { panic!("plain") }).await;
        assert_eq!(literal, Err::<(), _>(Panic("plain".into())));
    }
}
