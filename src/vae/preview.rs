//! A cheap latent-to-RGB preview for step callbacks: a fixed linear projection of the latent
//! channels, thousands of times cheaper than a VAE decode. The coefficients are the widely
//! used fit for the Stable Diffusion 1.x/2.x VAE (SD's 4 latent channels to RGB).

use candle_core::Tensor;

use crate::error::Result;

const SD_LATENT_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// An RGB preview (8-bit, row-major, one pixel per latent) of one latent (c, h, w).
/// With other than 4 channels the preview is the channel mean in grey.
pub fn latent_preview(latent: &Tensor) -> Result<(Vec<u8>, usize, usize)> {
    let (c, h, w) = latent.dims3()?;
    let data: Vec<f32> = latent.flatten_all()?.to_vec1()?;
    let mut rgb = vec![0u8; h * w * 3];
    for p in 0..h * w {
        for k in 0..3 {
            let v: f32 = if c == 4 {
                (0..4)
                    .map(|ch| data[ch * h * w + p] * SD_LATENT_RGB[ch][k])
                    .sum()
            } else {
                (0..c).map(|ch| data[ch * h * w + p]).sum::<f32>() / c as f32 * 0.5
            };
            rgb[p * 3 + k] = (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    Ok((rgb, w, h))
}
