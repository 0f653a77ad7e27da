//! Splitting a kernel's work over the cores, with the same thread count as candle's own ops
//! (RAYON_NUM_THREADS / CANDLE_NUM_THREADS), so one setting governs the whole process. The work
//! runs on rayon's global pool, the one candle's matrix products use: no thread is started per
//! call, and concurrent callers (the server's requests) share the cores instead of
//! oversubscribing them.
//!
//! A job's stop request ([`crate::cancel`]) travels with the work: each piece checks it before
//! it starts, so a stopped job's threads are free after the pieces already running.

use crate::cancel::Watch;

/// Threads to use for `items` independent pieces of work: at most this thread's share of the
/// cores (all of them, or a shard's part inside [`in_shards`]). candle's thread count is looked
/// up once: without RAYON_NUM_THREADS it is recomputed from /proc/cpuinfo on every call.
pub fn threads_for(items: usize) -> usize {
    threads_here().min(items).max(1)
}

fn threads_total() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// The threads the kernels called on this thread may use.
fn threads_here() -> usize {
    match SHARE.with(|s| s.get()) {
        0 => threads_total(),
        n => n,
    }
}

thread_local! {
    /// This thread's share of the cores while it runs a shard (0: no limit, all of them).
    static SHARE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f` with the kernels called on this thread limited to `threads` threads.
pub(crate) fn with_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            SHARE.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SHARE.with(|s| s.replace(threads.max(1))));
    f()
}

/// Runs `f` with the kernels single-threaded on this thread: for work that is itself split
/// over the threads at a coarser grain (a convolution's images, one run per thread).
pub fn serially<R>(f: impl FnOnce() -> R) -> R {
    with_threads(1, f)
}

/// This thread's share of a memory budget meant for the whole process: all of it, or, inside a
/// shard of [`in_shards`] (which run side by side), the shard's part.
pub fn share_of(budget: usize) -> usize {
    match SHARE.with(|s| s.get()) {
        0 => budget,
        n => budget / threads_total() * n.min(threads_total()),
    }
}

/// Runs `f(start, len)` over `batch` rows split into one contiguous shard per thread (at most),
/// side by side, each with its share of the threads for the kernels inside it (one when there
/// are as many shards as threads), and returns the shards' results in order; one call on this
/// thread when there is one thread or one row. A forward or backward pass is thousands of
/// small ops that parallelise poorly one at a time; whole shards in parallel keep the cores
/// busy. With more threads than rows (classifier-free guidance's pair on 16 cores), each
/// shard's kernels still spread over its share: single-threaded shards used 2 of 16 cores.
pub fn in_shards<R: Send>(batch: usize, f: &(dyn Fn(usize, usize) -> R + Sync)) -> Vec<R> {
    let available = threads_here();
    let n = available.min(batch).max(1);
    if n <= 1 {
        return vec![f(0, batch)];
    }
    let per = batch.div_ceil(n);
    let shards = batch.div_ceil(per);
    let watch = Watch::current();
    use rayon::prelude::*;
    (0..shards)
        .into_par_iter()
        .map(|i| {
            let start = i * per;
            // The threads split as evenly as they go: 16 over 3 shards as 6, 5, 5.
            let threads = available / shards + usize::from(i < available % shards);
            watch.enter(|| with_threads(threads, || f(start, per.min(batch - start))))
        })
        .collect()
}

/// Calls `f(index, chunk)` for each `chunk_len`-sized chunk of `out`, spread over the threads
/// in contiguous runs (the chunks are uniform work, so a static split is balanced).
pub fn for_each_chunk<T, F>(out: &mut [T], chunk_len: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync,
{
    for_each_chunk_with(out, chunk_len, || (), |_, i, chunk| f(i, chunk));
}

/// [`for_each_chunk`] with per-thread state: `init` makes one per run of chunks (scratch
/// buffers allocated once per thread, not once per chunk).
pub fn for_each_chunk_with<T, S, I, F>(out: &mut [T], chunk_len: usize, init: I, f: F)
where
    T: Send,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize, &mut [T]) + Sync,
{
    if chunk_len == 0 || out.is_empty() {
        return;
    }
    let items = out.len() / chunk_len;
    let threads = threads_for(items);
    let watch = Watch::current();
    if threads == 1 {
        let mut state = init();
        for (i, chunk) in out.chunks_mut(chunk_len).enumerate() {
            if watch.stopped() {
                return;
            }
            f(&mut state, i, chunk);
        }
        return;
    }
    let per = items.div_ceil(threads);
    rayon::scope(|scope| {
        for (t, part) in out.chunks_mut(per * chunk_len).enumerate() {
            let (f, init, watch) = (&f, &init, &watch);
            scope.spawn(move |_| {
                watch.enter(|| {
                    let mut state = init();
                    for (i, chunk) in part.chunks_mut(chunk_len).enumerate() {
                        if watch.stopped() {
                            return;
                        }
                        f(&mut state, t * per + i, chunk);
                    }
                })
            });
        }
    });
}

/// Calls `f(state, index)` for every index below `items`, spread over the threads in
/// contiguous runs, with one `init()` state per run; for work whose outputs are not one
/// contiguous chunk per index (written through a [`SharedMut`]).
pub fn for_each_index_with<S, I, F>(items: usize, init: I, f: F)
where
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize) + Sync,
{
    let threads = threads_for(items);
    let watch = Watch::current();
    let run = |state: &mut S, range: std::ops::Range<usize>| {
        for i in range {
            if watch.stopped() {
                return;
            }
            f(state, i);
        }
    };
    if threads <= 1 {
        run(&mut init(), 0..items);
        return;
    }
    let per = items.div_ceil(threads);
    rayon::scope(|scope| {
        for start in (0..items).step_by(per) {
            let (run, init, watch) = (&run, &init, &watch);
            scope.spawn(move |_| watch.enter(|| run(&mut init(), start..(start + per).min(items))));
        }
    });
}

/// A zeroed buffer of `len` values for a kernel's output, zeroed by the threads side by side
/// when it is large. A fresh buffer's pages are first touched (and cleared by the kernel, a
/// page fault per 4 KiB) by whoever zeroes it; done on the calling thread alone, that kept the
/// other cores idle (an SD 1.5 VAE decode to 512x512 on 2 cores, its first run, alternated:
/// 13.66 / 13.06 s before, 13.31 / 12.76 s after).
pub fn zeroed(len: usize) -> Vec<f32> {
    const PARALLEL_FROM: usize = 1 << 20;
    let threads = threads_for(len / PARALLEL_FROM);
    if threads <= 1 {
        return vec![0f32; len];
    }
    let mut buffer = Vec::with_capacity(len);
    let per = len.div_ceil(threads);
    rayon::scope(|scope| {
        for part in buffer.spare_capacity_mut()[..len].chunks_mut(per) {
            scope.spawn(move |_| {
                part.fill(std::mem::MaybeUninit::new(0.0));
            });
        }
    });
    // SAFETY: the parts above wrote all `len` values, within the capacity.
    unsafe { buffer.set_len(len) };
    buffer
}

/// A raw pointer to an output buffer that parallel work may share: each piece of work
/// writes its own disjoint set of elements (the user's unsafe blocks say which).
#[derive(Clone, Copy)]
pub struct SharedMut(*mut f32);

// SAFETY: the wrapper only moves the address between threads; every dereference is an unsafe
// block of its user, which guarantees that no two threads touch the same element.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub fn new(buffer: &mut [f32]) -> Self {
        Self(buffer.as_mut_ptr())
    }

    /// Through a method, so closures capture the whole (Sync) wrapper, not its raw field.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::{
        for_each_chunk, for_each_index_with, in_shards, threads_for, with_threads, zeroed,
    };

    #[test]
    fn zeroed_buffers_are_zero_at_every_size() {
        // Below and above the size that is zeroed in parallel, with a ragged last part.
        for len in [0, 5, 1 << 20, (3 << 20) + 7] {
            let buffer = zeroed(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0.0), "len {len}");
        }
    }

    #[test]
    fn shards_split_the_threads_they_are_given() {
        // Inside an 8-thread share: two shards of 4, three of 3 + 3 + 2; more shards than
        // threads run single-threaded, one per thread.
        let shares =
            |batch: usize| with_threads(8, || in_shards(batch, &|_, _| threads_for(usize::MAX)));
        assert_eq!(shares(2), vec![4, 4]);
        assert_eq!(shares(3), vec![3, 3, 2]);
        assert_eq!(shares(16), vec![1; 8]);
        assert_eq!(with_threads(8, || threads_for(usize::MAX)), 8);
        // Outside any share the limit is lifted again.
        assert_eq!(threads_for(usize::MAX), super::threads_total());
        // Memory budgets: all of it outside a shard, a shard's part inside one.
        let total = super::threads_total();
        assert_eq!(super::share_of(1000), 1000);
        assert_eq!(with_threads(1, || super::share_of(total * 64)), 64);
    }

    #[test]
    fn every_chunk_is_visited_once_with_its_index() {
        // 37 chunks of 3 over however many threads the pool has: uneven split on purpose.
        let mut out = vec![0f32; 37 * 3];
        for_each_chunk(&mut out, 3, |i, chunk| {
            for (j, v) in chunk.iter_mut().enumerate() {
                *v += (i * 3 + j) as f32 + 1.0;
            }
        });
        let expected: Vec<f32> = (0..37 * 3).map(|k| k as f32 + 1.0).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn every_index_is_visited_once_with_a_state_per_run() {
        let seen = std::sync::Mutex::new(Vec::new());
        let states = std::sync::atomic::AtomicUsize::new(0);
        let init = || states.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for_each_index_with(37, init, |_, i| seen.lock().unwrap().push(i));
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, (0..37).collect::<Vec<_>>());
        let runs = states.into_inner();
        assert!((1..=37).contains(&runs), "{runs} states");
    }
}
