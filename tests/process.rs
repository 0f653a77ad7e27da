//! `text2img::process::configure`: the settings a program built on the library gets. A test
//! without the harness (`harness = false`), so that it runs on the main thread, allocating
//! from glibc's main arena as a program's `main` does, before anything else has allocated.

fn main() {
    std::env::remove_var("CANDLE_NUM_THREADS");
    std::env::set_var("RAYON_NUM_THREADS", "3");
    text2img::process::configure();
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").unwrap(), "1");
    // An explicit setting is kept.
    assert_eq!(std::env::var("RAYON_NUM_THREADS").unwrap(), "3");
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's default maps a buffer this large on its own (over 32 MiB, whatever its
        // dynamic threshold) and unmaps it when freed; configured, it comes from the heap.
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let mapped = || unsafe { libc::mallinfo2() }.hblks;
        let before = mapped();
        let buffer = std::hint::black_box(vec![1u8; 48 << 20]);
        assert_eq!(mapped(), before, "a 48 MiB buffer was mapped on its own");
        drop(buffer);
    }
    println!("process settings: ok");
}
