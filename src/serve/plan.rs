//! From what a client asked to the batches the worker runs: defaults filled from the model,
//! every limit of the server checked, each failure a 400 that names its field.

use crate::latent::schedulers::SchedulerKind;
use image::{GrayImage, RgbImage};

use std::path::PathBuf;

use crate::pipeline::{
    ControlUnit, GenerateRequest, GuidanceInterval, HiresFix, InpaintOptions, LoraSpec, Pipeline,
    ResizeMode, Resolved,
};

use super::api_error::ApiError;

/// The server's limits on one request.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_size: usize,
    pub max_steps: usize,
    /// Images per request (A1111's batch_size x n_iter, OpenAI's n).
    pub max_images: usize,
}

/// A request as the client gave it (`None` = the model's default).
#[derive(Clone, Debug, Default)]
pub struct Asked {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub steps: Option<i64>,
    pub cfg_scale: Option<f64>,
    /// Extensions of the A1111 API (the CLI's `--guidance-rescale`, `--guidance-interval`
    /// and `--autoguidance`); absent: the model's defaults.
    pub guidance_rescale: Option<f64>,
    pub guidance_interval: Option<(f64, f64)>,
    pub autoguidance: Option<f64>,
    /// -1 or absent: a random seed.
    pub seed: Option<i64>,
    pub scheduler: Option<SchedulerKind>,
    pub eta: Option<f64>,
    pub batch_size: Option<i64>,
    pub n_iter: Option<i64>,
    /// The name of the field that holds the image count (`batch_size` or `n`).
    pub count_field: &'static str,
    /// img2img and inpainting (`init_images[0]`, `mask`, `denoising_strength`).
    pub init_image: Option<RgbImage>,
    pub mask: Option<GrayImage>,
    pub strength: Option<f64>,
    pub resize_mode: ResizeMode,
    pub inpaint: InpaintOptions,
    /// txt2img's hires fix (`enable_hr` and its fields).
    pub hires: Option<HiresFix>,
    /// `refiner_switch_at`, for a server started with a refiner.
    pub refiner_start: Option<f64>,
    /// The checkpoint to run on (`override_settings.sd_model_checkpoint`); `None`: the
    /// selected one.
    pub checkpoint: Option<String>,
    /// The VAE to run with (`override_settings.sd_vae`); `None`: the selected one.
    pub vae: Option<String>,
    /// ControlNet units (`alwayson_scripts.controlnet`); each `net` indexes `controlnets`.
    pub controls: Vec<ControlUnit>,
    pub controlnets: Vec<PathBuf>,
}

/// What the worker will run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// One generate call per iteration; batch k starts at seed + k * batch_size.
    pub batches: Vec<GenerateRequest>,
    /// The LoRAs the prompt names (`<lora:NAME:W>`), for this job only.
    pub loras: Vec<LoraSpec>,
    /// The ControlNet files the batches' units use, in the order of their `net`.
    pub controlnets: Vec<PathBuf>,
    pub resolved: Resolved,
    pub seed: u64,
    pub batch_size: usize,
    pub n_iter: usize,
}

/// `find_lora` gives the file of a LoRA the prompt names, or why there is none.
pub fn plan(
    pipeline: &Pipeline,
    limits: &Limits,
    asked: &Asked,
    find_lora: &dyn Fn(&str) -> Result<PathBuf, String>,
) -> Result<Plan, ApiError> {
    let f = pipeline.vae_scale_factor();
    let size = |name: &str, v: Option<i64>| -> Result<Option<usize>, ApiError> {
        match v {
            None => Ok(None),
            Some(v) if v <= 0 || v % f as i64 != 0 => Err(ApiError::field(
                name,
                format!("must be a positive multiple of {f}, not {v}"),
            )),
            Some(v) if v as usize > limits.max_size => Err(ApiError::field(
                name,
                format!("{v} is over the server's limit of {}", limits.max_size),
            )),
            Some(v) => Ok(Some(v as usize)),
        }
    };
    let width = size("width", asked.width)?;
    let height = size("height", asked.height)?;
    let steps = match asked.steps {
        Some(s) if s <= 0 || s as usize > limits.max_steps => {
            return Err(ApiError::field(
                "steps",
                format!("must be between 1 and {}, not {s}", limits.max_steps),
            ))
        }
        s => s.map(|s| s as usize),
    };
    if let Some(g) = asked.cfg_scale {
        if !g.is_finite() || g < 0.0 {
            return Err(ApiError::field("cfg_scale", "must be a number >= 0"));
        }
    }
    if let Some(r) = asked.guidance_rescale {
        if !(0.0..=1.0).contains(&r) {
            return Err(ApiError::field(
                "guidance_rescale",
                format!("must be between 0 and 1, not {r}"),
            ));
        }
    }
    let guidance_interval = asked
        .guidance_interval
        .map(|(start, end)| GuidanceInterval::new(start, end))
        .transpose()
        .map_err(|e| ApiError::field("guidance_interval", e.to_string()))?;
    if let Some(w) = asked.autoguidance {
        if !w.is_finite() || w < 0.0 {
            return Err(ApiError::field("autoguidance", "must be a number >= 0"));
        }
        if w > 1.0 && pipeline.guide_unet.is_none() {
            return Err(ApiError::field(
                "autoguidance",
                format!("{w} needs a guide U-Net; this model has none (1 or less is off)"),
            ));
        }
    }
    // A1111 clients ask for LoRAs in the prompt; the tags leave the text.
    let (prompt, tags) = crate::text::extra_networks::take_lora_tags(&asked.prompt)
        .map_err(|e| ApiError::field("prompt", e))?;
    let loras = tags
        .iter()
        .map(|tag| {
            Ok(LoraSpec {
                path: find_lora(&tag.name).map_err(|e| ApiError::field("prompt", e))?,
                text_weight: tag.text_weight,
                unet_weight: tag.unet_weight,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let eta = asked.eta.unwrap_or(0.0);
    if !eta.is_finite() || eta < 0.0 {
        return Err(ApiError::field("eta", "must be a number >= 0"));
    }
    let count = |name: &str, v: Option<i64>| -> Result<usize, ApiError> {
        match v.unwrap_or(1) {
            v if v < 1 => Err(ApiError::field(
                name,
                format!("must be at least 1, not {v}"),
            )),
            v => Ok(v as usize),
        }
    };
    let batch_size = count(asked.count_field, asked.batch_size)?;
    let n_iter = count("n_iter", asked.n_iter)?;
    if batch_size.saturating_mul(n_iter) > limits.max_images {
        return Err(ApiError::field(
            asked.count_field,
            format!(
                "asks for {} images; the server makes at most {} per request",
                batch_size.saturating_mul(n_iter),
                limits.max_images
            ),
        ));
    }
    let seed = match asked.seed {
        None | Some(-1) => u64::from(rand::random::<u32>()),
        Some(s) if s >= 0 => s as u64,
        Some(s) => {
            return Err(ApiError::field(
                "seed",
                format!("must be -1 (random) or a number >= 0, not {s}"),
            ))
        }
    };
    let base = GenerateRequest {
        prompts: vec![prompt],
        // An empty negative prompt is no negative prompt (SDXL: zero embeddings).
        negative_prompts: Some(asked.negative_prompt.clone())
            .filter(|n| !n.is_empty())
            .map(|n| vec![n]),
        seed: Some(seed),
        steps,
        guidance_scale: asked.cfg_scale,
        guidance_rescale: asked.guidance_rescale,
        guidance_interval,
        autoguidance: asked.autoguidance,
        scheduler: asked.scheduler,
        width,
        height,
        num_images: batch_size,
        eta,
        init_image: asked.init_image.clone(),
        mask: asked.mask.clone(),
        strength: asked.strength,
        resize_mode: asked.resize_mode,
        inpaint: asked.inpaint.clone(),
        hires: asked.hires.clone(),
        refiner_start: asked.refiner_start,
        controls: asked.controls.clone(),
        ..GenerateRequest::default()
    };
    let resolved = pipeline
        .resolve(&base)
        .map_err(|e| ApiError::bad_request(e.message()))?;
    // The model's own defaults (or the picture's size) must fit the server's limits too.
    let (hires_w, hires_h) = resolved.output_size();
    for (name, v) in [
        ("width", resolved.width),
        ("height", resolved.height),
        ("hr_scale", hires_w),
        ("hr_scale", hires_h),
    ] {
        if v > limits.max_size {
            return Err(ApiError::field(
                name,
                format!(
                    "(giving {v}) is over the server's limit of {}",
                    limits.max_size
                ),
            ));
        }
    }
    if resolved.steps > limits.max_steps {
        return Err(ApiError::field(
            "steps",
            format!(
                "(the model's default {}) is over the server's limit of {}",
                resolved.steps, limits.max_steps
            ),
        ));
    }
    let batches = (0..n_iter)
        .map(|k| GenerateRequest {
            seed: Some(seed + (k * batch_size) as u64),
            steps: Some(resolved.steps),
            guidance_scale: Some(resolved.guidance_scale),
            scheduler: Some(resolved.scheduler),
            width: Some(resolved.width),
            height: Some(resolved.height),
            ..base.clone()
        })
        .collect();
    Ok(Plan {
        batches,
        loras,
        controlnets: asked.controlnets.clone(),
        resolved,
        seed,
        batch_size,
        n_iter,
    })
}

/// A1111's sampler (`sampler_name`) and schedule type (`scheduler`, newer clients) to a
/// scheduler kind. Names match A1111's spelling, case-insensitively, or text2img's CLI names.
pub fn a1111_sampler(
    name: Option<&str>,
    schedule: Option<&str>,
) -> Result<Option<SchedulerKind>, ApiError> {
    let kind = match name.map(str::trim).filter(|n| !n.is_empty()) {
        None => None,
        Some(n) => Some(
            SchedulerKind::ALL
                .into_iter()
                .find(|k| {
                    k.a1111_name().eq_ignore_ascii_case(n)
                        || k.cli_name().eq_ignore_ascii_case(n)
                        || a1111_aliases(*k).iter().any(|a| a.eq_ignore_ascii_case(n))
                })
                .ok_or_else(|| {
                    ApiError::field(
                        "sampler_name",
                        format!(
                            "`{n}` is not a known sampler; known: {}",
                            SchedulerKind::ALL.map(|k| k.a1111_name()).join(", ")
                        ),
                    )
                })?,
        ),
    };
    match schedule.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(kind),
        Some(s) if s.eq_ignore_ascii_case("automatic") => Ok(kind),
        Some(s) if s.eq_ignore_ascii_case("karras") => match kind {
            Some(SchedulerKind::DpmPP2M | SchedulerKind::DpmPP2MKarras) => {
                Ok(Some(SchedulerKind::DpmPP2MKarras))
            }
            _ => Err(ApiError::field(
                "scheduler",
                "`Karras` is available with the `DPM++ 2M` sampler only",
            )),
        },
        Some(s) => Err(ApiError::field(
            "scheduler",
            format!("`{s}` is not a known schedule type; known: Automatic, Karras"),
        )),
    }
}

/// The older k-diffusion names some A1111 clients still send.
pub fn a1111_aliases(kind: SchedulerKind) -> &'static [&'static str] {
    match kind {
        SchedulerKind::Pndm => &["plms"],
        SchedulerKind::Ddim => &["ddim"],
        SchedulerKind::Ddpm => &["ddpm"],
        SchedulerKind::Euler => &["k_euler"],
        SchedulerKind::EulerAncestral => &["k_euler_a"],
        SchedulerKind::DpmPP2M => &["k_dpmpp_2m"],
        SchedulerKind::DpmPP2MKarras => &["k_dpmpp_2m_ka"],
        SchedulerKind::Lcm => &["k_lcm"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_as_a1111_spells_them() {
        let k = |n, s| a1111_sampler(n, s).unwrap();
        assert_eq!(
            k(Some("Euler a"), None),
            Some(SchedulerKind::EulerAncestral)
        );
        assert_eq!(
            k(Some("PLMS"), Some("Automatic")),
            Some(SchedulerKind::Pndm)
        );
        assert_eq!(
            k(Some("DPM++ 2M"), Some("Karras")),
            Some(SchedulerKind::DpmPP2MKarras)
        );
        assert_eq!(
            k(Some("DPM++ 2M Karras"), None),
            Some(SchedulerKind::DpmPP2MKarras)
        );
        assert_eq!(k(Some("dpm++ 2m"), None), Some(SchedulerKind::DpmPP2M));
        assert_eq!(k(None, None), None);
        let err = a1111_sampler(Some("Heun"), None).unwrap_err();
        assert!(err.message.contains("known: PLMS, DDIM"), "{}", err.message);
        assert_eq!(err.field.as_deref(), Some("sampler_name"));
        let err = a1111_sampler(Some("Euler"), Some("Karras")).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("scheduler"));
    }
}
