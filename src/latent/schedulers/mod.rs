//! Schedulers: the numerical integrators of reverse diffusion.
//!
//! A scheduler is built from a diffusers `scheduler_config.json` exactly as diffusers'
//! `NewScheduler.from_config(old.config)` builds it (see [`config`]), then set to a step count
//! with [`build`]. The pipeline asks it for the timesteps to feed the U-Net, scales the model
//! input, and steps the latents.
//!
//! Each scheduler follows its diffusers 0.42 class operation by operation: float32 torch
//! arithmetic where diffusers uses torch tensors, float64 numpy arithmetic where it uses numpy
//! (see `common.rs`). What remains is torch's float32 `sqrt`/`log`/`exp` (MKL, not correctly
//! rounded) and numpy's SIMD float32 `log`, which differ from ours by an ulp here and there.
//!
//! - [`pndm`]: `PNDMScheduler` (PLMS, and the Runge-Kutta warm-up without `skip_prk_steps`);
//! - [`ddim`]: `DDIMScheduler` (eta > 0 draws noise);
//! - [`ddpm`]: `DDPMScheduler` (draws noise at every step whose timestep is above 0);
//! - [`euler`]: `EulerDiscreteScheduler` (float timesteps);
//! - [`euler_ancestral`]: `EulerAncestralDiscreteScheduler` (draws noise at every step);
//! - [`dpm_solver`]: `DPMSolverMultistepScheduler` (`dpm++2m`, `dpm++2m-karras`);
//! - [`lcm`]: `LCMScheduler` (draws noise at every step but the last).
//!
//! Every scheduler takes its steps in order, `index` = 0, 1, ... over [`Scheduler::timesteps`].

use candle_core::Tensor;

use crate::error::Result;
use crate::rng::BatchGenerator;

mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod lcm;
pub mod pndm;

pub use common::alphas_cumprod_for;
pub use config::{
    build, effective_config, resolved_config, stable_diffusion_pipeline_config, DdimConfig,
    DdpmConfig, DpmSolverMultistepConfig, EulerAncestralDiscreteConfig, EulerDiscreteConfig,
    LcmConfig, PndmConfig, SchedulerKind, SchedulerOptions, TimestepSpacing,
};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestralDiscrete;
pub use lcm::Lcm;
pub use pndm::Pndm;

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
    /// Begins the steps at the `index`-th timestep (img2img skips the first ones), as
    /// diffusers' pipelines call `set_begin_index`: the next `step` is `index`, and the Euler
    /// schedulers' sigmas follow the index, not their first-timestep lookup.
    fn set_begin_index(&mut self, index: usize) -> Result<()>;
    /// `original` noised to the level of the `index`-th timestep (diffusers' `add_noise` with
    /// the begin index set): img2img's start, and inpainting's known region at each step.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
}
