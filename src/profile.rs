//! Per-layer timers for `text2img bench --profile`: where a U-Net step or a decode spends its
//! time on machines where no sampling profiler runs. Off by default; a disabled span costs one
//! relaxed atomic load.
//!
//! Spans sit at the layer entry points (convolutions, linear layers, attention, norms), never
//! inside one another, so their sums do not double count. Where the guidance pair runs as
//! shards side by side, each shard's layers are timed on their own: the sums are then thread
//! time across shards, and the shares (not the seconds) compare with the step's wall time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, Total>> = Mutex::new(BTreeMap::new());

/// The time and the number of calls of one kind of layer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Total {
    pub seconds: f64,
    pub calls: u64,
    /// Floating-point operations the spans said they did (0 where a kind does not count).
    pub flops: f64,
}

/// Starts (or stops) recording spans.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether spans are being recorded (for callers whose span name costs work to find).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Forgets what was recorded.
pub fn reset() {
    lock().clear();
}

/// What was recorded since the last reset, by layer kind.
pub fn totals() -> BTreeMap<&'static str, Total> {
    lock().clone()
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<&'static str, Total>> {
    // A panic while holding the lock cannot leave the map half-updated: keep using it.
    TOTALS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Times the scope it lives in under `name` when profiling is on.
#[must_use = "a span times the scope that holds it"]
pub struct Span {
    name: &'static str,
    started: Option<Instant>,
    flops: f64,
}

pub fn span(name: &'static str) -> Span {
    let started = enabled().then(Instant::now);
    Span {
        name,
        started,
        flops: 0.0,
    }
}

impl Span {
    /// Says that the spanned work does `flops` operations of `kind`: added to the cost count
    /// ([`crate::flops`]) and, when profiling, to this kind's total for its rate.
    pub fn counting(mut self, kind: crate::flops::Kind, flops: f64) -> Self {
        crate::flops::add(kind, flops);
        self.flops = flops;
        self
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            let seconds = started.elapsed().as_secs_f64();
            let mut totals = lock();
            let t = totals.entry(self.name).or_default();
            t.seconds += seconds;
            t.calls += 1;
            t.flops += self.flops;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test touches the process-wide switch, so no other test sees it on.
    #[test]
    fn spans_count_only_while_enabled() {
        {
            let _s = span("test layer");
        }
        assert!(!totals().contains_key("test layer"));
        enable(true);
        for _ in 0..3 {
            let _s = span("test layer").counting(crate::flops::Kind::Dense, 1e6);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        enable(false);
        {
            let _s = span("test layer");
        }
        let t = totals()["test layer"];
        assert_eq!(t.calls, 3);
        assert!(t.seconds >= 0.006, "{t:?}");
        assert_eq!(t.flops, 3e6);
        reset();
        assert!(totals().is_empty());
    }
}
