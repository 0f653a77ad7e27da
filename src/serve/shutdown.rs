//! Stopping the server on SIGTERM or Ctrl-C: stop accepting, answer the queued requests 503,
//! give the running job the grace period, then cancel it (the pipeline stops inside its step,
//! within about a second) and exit. A second signal exits at once. Connections that stay open
//! (a client that never reads its answer, or trickles a body) never keep the process alive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::worker::Queue;

/// How long answers already made get to reach their clients before the process exits.
const DRAIN: Duration = Duration::from_millis(500);
/// How long a cancelled job gets to let go of the cores.
const CANCEL_WAIT: Duration = Duration::from_secs(1);

/// Runs the whole shutdown: returns when the process should exit, whatever connections are
/// still open. `stopping` is told when the first signal arrives (the server stops
/// accepting); then `drain` runs.
pub async fn sequence(
    drain: impl std::future::Future<Output = ()>,
    stopping: tokio::sync::watch::Sender<bool>,
) {
    let mut signals = Signals::new();
    signals.next().await;
    let _ = stopping.send(true);
    exit_on_second_signal(signals);
    drain.await;
    tokio::time::sleep(DRAIN).await;
}

/// From here on a signal means "now": the default action is gone once a handler exists,
/// so without this a second SIGTERM would do nothing.
pub fn exit_on_second_signal(mut signals: Signals) {
    tokio::spawn(async move {
        let code = signals.next().await;
        eprintln!("second signal: exiting now");
        std::process::exit(code);
    });
}

/// What an in-process server owes its requests: queued ones answered 503, the running one
/// given the grace period, then cancelled.
pub async fn drain_queue(queue: Arc<Queue>, grace: Duration) {
    eprintln!("shutting down: answering queued requests 503");
    if queue.close() {
        eprintln!(
            "letting the running request finish (at most {:.1} s)",
            grace.as_secs_f64()
        );
        if !idle_within(&queue, grace).await {
            eprintln!("grace period over: cancelling the running request");
            queue.cancel_running();
            if !idle_within(&queue, CANCEL_WAIT).await {
                eprintln!("the cancelled request has not stopped; exiting anyway");
            }
        }
    }
}

/// Whether the worker is idle within `limit`.
async fn idle_within(queue: &Queue, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !queue.is_running() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM and SIGINT (Ctrl-C), each answering with the exit code a shell gives a process
/// that such a signal ended (128 + its number).
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

impl Signals {
    pub fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    pub async fn next(&mut self) -> i32 {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.term) => 128 + libc::SIGTERM,
                () = recv(&mut self.int) => 128 + libc::SIGINT,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            130
        }
    }
}
