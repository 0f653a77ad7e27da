//! Stopping a generation from another thread, inside a denoising step.
//!
//! One U-Net step of a large image takes minutes on a CPU, so a stop looked at only between
//! steps leaves the cores busy long after the client has gone. Instead the thread that runs a
//! generation *watches* one or more [`CancelFlag`]s ([`watching`]); the layers check them
//! before each convolution, linear layer and attention ([`check`]), and the parallel kernels
//! between the pieces of work they hand out ([`Watch::stopped`]), so a stop frees every thread
//! within a fraction of a second. The watched flags travel with the work onto the threads of
//! the pool ([`Watch::current`] and [`Watch::enter`], used by `kernels::parallel`).
//!
//! A kernel that sees a stop skips its remaining pieces and returns what it has (zeros where it
//! did not write); the next layer's [`check`] turns that into [`Error::Cancelled`], so a
//! stopped run never returns a half-computed tensor as a result.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A stop request shared between the thread that asks and the threads that work. Clones
/// share the flag.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every run watching this flag to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The flags a thread's work watches: none outside [`watching`].
#[derive(Clone, Debug, Default)]
pub struct Watch(Option<Arc<[CancelFlag]>>);

thread_local! {
    static WATCHED: RefCell<Watch> = RefCell::new(Watch::default());
}

impl Watch {
    /// The flags watched on this thread, to carry into work handed to other threads.
    pub fn current() -> Self {
        WATCHED.with(|w| w.borrow().clone())
    }

    /// Whether any watched flag asks to stop.
    pub fn stopped(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|flags| flags.iter().any(CancelFlag::is_cancelled))
    }

    /// Runs `f` on this thread with these flags watched instead of the thread's own (a task
    /// of the pool runs on behalf of whoever handed it out).
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Watch>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(previous) = self.0.take() {
                    WATCHED.with(|w| *w.borrow_mut() = previous);
                }
            }
        }
        let previous = WATCHED.with(|w| w.replace(self.clone()));
        let _restore = Restore(Some(previous));
        f()
    }
}

/// Runs `f` with `flags` watched on this thread (and on the pool's threads for the kernels it
/// calls), in addition to any watched already.
pub fn watching<R>(flags: &[&CancelFlag], f: impl FnOnce() -> R) -> R {
    let outer = Watch::current();
    let all: Vec<CancelFlag> = outer
        .0
        .iter()
        .flat_map(|flags| flags.iter().cloned())
        .chain(flags.iter().map(|&f| f.clone()))
        .collect();
    Watch(Some(all.into())).enter(f)
}

/// Whether a flag watched on this thread asks to stop.
pub fn requested() -> bool {
    WATCHED.with(|w| w.borrow().stopped())
}

/// `Err(Error::Cancelled)` once a watched flag asks to stop: called by the layers before
/// each piece of heavy work.
pub fn check() -> Result<()> {
    if requested() {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_seen_only_while_watched() {
        let flag = CancelFlag::new();
        flag.cancel();
        assert!(check().is_ok(), "nothing is watched outside `watching`");
        assert!(watching(&[&flag], || matches!(
            check(),
            Err(Error::Cancelled)
        )));
        assert!(!requested(), "the watch ends with `watching`");
    }

    #[test]
    fn nested_watches_add_up_and_restore() {
        let (outer, inner) = (CancelFlag::new(), CancelFlag::new());
        watching(&[&outer], || {
            watching(&[&inner], || {
                assert!(!requested());
                outer.cancel();
                assert!(requested(), "the outer flag is still watched inside");
            });
            assert!(requested());
        });
        let fresh = CancelFlag::new();
        watching(&[&fresh], || {
            assert!(!requested(), "the inner watch was restored")
        });
    }

    #[test]
    fn a_watch_travels_to_other_threads() {
        let flag = CancelFlag::new();
        let watch = watching(&[&flag], Watch::current);
        let seen = std::thread::spawn(move || {
            let before = watch.enter(requested);
            flag.cancel();
            (before, watch.enter(requested), requested())
        })
        .join()
        .unwrap();
        assert_eq!(seen, (false, true, false));
    }
}
