//! The timestep embedding: sinusoidal features, then a two-layer MLP.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::nn::{silu, Linear};
use crate::weights::Vb;

/// diffusers' `get_timestep_embedding` for one timestep per batch row, computed in f32 as
/// torch does.
pub fn timestep_features(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let max_period = 10000f64;
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let mut sin = Vec::with_capacity(half);
        let mut cos = Vec::with_capacity(half);
        for i in 0..half {
            // exponent = -ln(max_period) * i / (half - shift), in f32 like torch.arange(float32).
            let exponent =
                (-(max_period.ln() as f32) * i as f32) / (half as f32 - freq_shift as f32);
            let arg = t * exponent.exp();
            sin.push(arg.sin());
            cos.push(arg.cos());
        }
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// `time_embedding`: linear_1, SiLU, linear_2; LCM U-Nets first add `cond_proj` of the
/// guidance-scale embedding to the input features.
#[derive(Clone)]
pub struct TimestepEmbedding {
    cond_proj: Option<Linear>,
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(vb: &Vb, in_dim: usize, dim: usize) -> Result<Self> {
        Self::load_with_cond(vb, in_dim, dim, None)
    }

    pub fn load_with_cond(
        vb: &Vb,
        in_dim: usize,
        dim: usize,
        cond_dim: Option<usize>,
    ) -> Result<Self> {
        Ok(Self {
            cond_proj: cond_dim
                .map(|c| Linear::load(&vb.pp("cond_proj"), c, in_dim, false))
                .transpose()?,
            linear_1: Linear::load(&vb.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(x)?)?)
    }

    /// With the condition (LCM's guidance embedding), when the embedding takes one.
    pub fn forward_cond(&self, x: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let x = match (&self.cond_proj, cond) {
            (Some(proj), Some(c)) => (x + proj.forward(c)?)?,
            _ => x.clone(),
        };
        self.forward(&x)
    }
}

/// diffusers' `get_guidance_scale_embedding`: sinusoidal features of (w - 1) x 1000 that
/// LCM-distilled U-Nets take in place of a second, unconditional pass.
pub fn guidance_scale_embedding(
    guidance_scales: &[f64],
    dim: usize,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    // torch: log(tensor(10000.)) / (half - 1), then exp(arange(half) * -that), all float32.
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp()).collect();
    let mut data = Vec::with_capacity(guidance_scales.len() * dim);
    for &g in guidance_scales {
        let w = ((g - 1.0) as f32) * 1000.0;
        data.extend(freqs.iter().map(|f| (w * f).sin()));
        data.extend(freqs.iter().map(|f| (w * f).cos()));
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(
        data,
        (guidance_scales.len(), dim),
        device,
    )?)
}

crate::impl_layers!(TimestepEmbedding: cond_proj, linear_1, linear_2);
