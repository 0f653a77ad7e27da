//! Process-wide settings that make a program built on the library as fast as the `text2img`
//! binary. Call [`configure`] first thing in `main`, before any other thread starts (it sets
//! environment variables and the C allocator's thresholds, which are not thread-safe to
//! change later).

/// Applies every setting below; explicit environment variables are kept.
pub fn configure() {
    tune_allocator();
    pin_thread_count();
}

/// Keeps freed tensor buffers in the heap instead of returning them to the OS: diffusion
/// allocates and frees the same large buffers every step, and glibc's default of mapping and
/// unmapping each one costs a page fault per 4 KiB. Measured: training 1.7 -> 2.5 images/s;
/// an SD 1.5 VAE decode to 512x512 17.1 -> 13.8 s (system time 14.7 -> 1.5 s).
///
/// One arena for every thread: glibc gives other threads (the loaders, the guidance shards)
/// arenas of 64 MiB heaps, where a larger buffer is mapped and unmapped on its own whatever
/// the thresholds above say. With one arena those buffers come from the main heap too,
/// reused from step to step, and under the counting allocator in huge pages
/// ([`crate::alloc_count`]): with both, an SD 1.5 bench at 512x512 on a 2-core AVX2 EPYC
/// took 0.36 M page faults instead of 1.4 M.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; callers run this before any threads
    // start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        // A count the user set (MALLOC_ARENA_MAX, or glibc's tunables) is kept.
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() && !tunables.contains("arena_max") {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Fixes the thread count once, and gives candle's element-wise ops one thread per shard.
/// Without RAYON_NUM_THREADS, candle works out the default (physical cores, read from
/// /proc/cpuinfo) again on every matrix product: 1,820 reads of /proc/cpuinfo in a 5-step
/// 64x64 generation.
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // Training batches and guidance pairs run in shards, one per thread. candle's element-wise
    // ops share one pool whose lock the shards would queue on (and whose worker spins between
    // ops): with CANDLE_NUM_THREADS=1 each shard runs them on its own thread. Two threads:
    // default-model training step 8.3 -> 12.4 images/s; its 20 generation steps
    // 0.87-0.92 -> 0.59-0.62 s.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
