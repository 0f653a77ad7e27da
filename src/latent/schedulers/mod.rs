//! Schedulers: the numerical integrators of reverse diffusion.
//!
//! A scheduler is built from a diffusers `scheduler_config.json` exactly as diffusers'
//! `NewScheduler.from_config(old.config)` builds it (see [`config`]), then set to a step count
//! with [`build`]. The pipeline asks it for the timesteps to feed the U-Net, scales the model
//! input, and steps the latents.

use candle_core::Tensor;

use crate::error::Result;
use crate::rng::BatchGenerator;

/// The per-run state of a scheduler set to a number of inference steps.
pub trait Scheduler: Send {
    /// The timesteps to feed the U-Net, in order (PNDM feeds one more than the step count).
    fn timesteps(&self) -> &[f64];
    /// The standard deviation of the initial noise (`init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64;
    /// `scale_model_input` for the `index`-th timestep.
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor>;
    /// One step from the `index`-th timestep; noise, when the method draws any, comes from
    /// `noise` in diffusers' order.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut BatchGenerator,
    ) -> Result<Tensor>;
}
