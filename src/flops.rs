//! Counting a model's floating-point operations as it runs: the layers add theirs
//! ([`add`]) while counting is on. Used to estimate a request's cost from a small probe
//! ([`crate::pipeline::cost`]); off, a layer pays one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static ON: AtomicBool = AtomicBool::new(false);
/// Attention's products (quadratic in the tokens), and everything else.
static ATTENTION: AtomicU64 = AtomicU64::new(0);
static DENSE: AtomicU64 = AtomicU64::new(0);

/// What kind of work a count is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Attention,
    Dense,
}

/// Adds `flops` of `kind` while counting.
pub fn add(kind: Kind, flops: f64) {
    if ON.load(Ordering::Relaxed) {
        let counter = match kind {
            Kind::Attention => &ATTENTION,
            Kind::Dense => &DENSE,
        };
        counter.fetch_add(flops as u64, Ordering::Relaxed);
    }
}

/// Counts the operations of `f`: (attention, dense). Counting is process-wide: run nothing
/// else meanwhile.
pub fn count<R>(f: impl FnOnce() -> R) -> (R, f64, f64) {
    ATTENTION.store(0, Ordering::Relaxed);
    DENSE.store(0, Ordering::Relaxed);
    ON.store(true, Ordering::Relaxed);
    let out = f();
    ON.store(false, Ordering::Relaxed);
    (
        out,
        ATTENTION.load(Ordering::Relaxed) as f64,
        DENSE.load(Ordering::Relaxed) as f64,
    )
}
