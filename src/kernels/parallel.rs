//! Splitting a kernel's work over the cores, with the same thread count as candle's own ops
//! (RAYON_NUM_THREADS / CANDLE_NUM_THREADS), so one setting governs the whole process.

/// Threads to use for `items` independent pieces of work.
pub fn threads_for(items: usize) -> usize {
    candle_core::utils::get_num_threads().min(items).max(1)
}

/// Calls `f(index, chunk)` for each `chunk_len`-sized chunk of `out`, spread over the threads
/// in contiguous runs (the chunks are uniform work, so a static split is balanced).
pub fn for_each_chunk<F>(out: &mut [f32], chunk_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if chunk_len == 0 || out.is_empty() {
        return;
    }
    let items = out.len() / chunk_len;
    let threads = threads_for(items);
    if threads == 1 {
        for (i, chunk) in out.chunks_mut(chunk_len).enumerate() {
            f(i, chunk);
        }
        return;
    }
    let per = items.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, part) in out.chunks_mut(per * chunk_len).enumerate() {
            let f = &f;
            scope.spawn(move || {
                for (i, chunk) in part.chunks_mut(chunk_len).enumerate() {
                    f(t * per + i, chunk);
                }
            });
        }
    });
}
