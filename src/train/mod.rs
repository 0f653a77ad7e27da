//! Training: data sets, the training loops, checkpoints.

pub mod autoencoder;
pub mod checker;
pub mod checkpoint;
pub mod data;
pub mod evaluate;
pub mod latent;
pub mod log;
pub mod optim;
pub mod shapes;

/// The random stream of one training step: a function of (seed, step) alone, so a resumed
/// run draws exactly the noise and timesteps an uninterrupted one would.
pub fn step_rng(seed: u64, step: u64) -> crate::rng::TorchGenerator {
    crate::rng::TorchGenerator::new(
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ step.wrapping_add(1).wrapping_mul(0xd1b5_4a32_d192_ed03),
    )
}

/// Runs `shard(start, len)` over the batch split into one contiguous shard per thread, each
/// shard's forward and backward pass on its own thread with the kernels inside it
/// single-threaded, and returns the shards' results in order. A training step is thousands of
/// small ops that parallelise poorly one at a time (the default model's step: 8.3 images/s on
/// one thread, 9.0 on two); whole shards in parallel keep both cores busy.
pub fn shards<R: Send>(
    batch: usize,
    shard: &(dyn Fn(usize, usize) -> crate::Result<R> + Sync),
) -> crate::Result<Vec<R>> {
    let n = crate::kernels::parallel::threads_for(batch);
    if n <= 1 {
        return Ok(vec![shard(0, batch)?]);
    }
    let per = batch.div_ceil(n);
    use rayon::prelude::*;
    (0..batch.div_ceil(per))
        .into_par_iter()
        .map(|i| {
            let start = i * per;
            crate::kernels::parallel::serially(|| shard(start, per.min(batch - start)))
        })
        .collect()
}
