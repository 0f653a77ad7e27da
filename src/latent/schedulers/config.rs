//! Scheduler configs, resolved as diffusers' `NewScheduler.from_config(old.config)` resolves
//! them, and the scheduler kinds the crate offers.
//!
//! The rule diffusers follows, and this module with it: start from the model folder's
//! `scheduler_config.json`; drop the keys listed in its `_use_default_values` (keys that were
//! defaults of the class that saved it) and every key starting with `_`; then read the target
//! class's `__init__` arguments from what is left. Keys the class does not take are ignored
//! and absent keys take the class's own defaults, which differ between classes (e.g.
//! `timestep_spacing` is `leading` for DDIM but `linspace` for Euler). A pipeline loaded with
//! `from_pretrained` and given a new scheduler with `New.from_config(pipe.scheduler.config)`
//! ends up with exactly this config.
//!
//! Each struct below has one field per `__init__` argument of its diffusers 0.42 class, with
//! the class's default values.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ddim::Ddim, ddpm::Ddpm, dpm_solver::DpmSolverMultistep, euler::EulerDiscrete};
use super::{euler_ancestral::EulerAncestralDiscrete, lcm::Lcm, pndm::Pndm, Scheduler};
use crate::error::{Error, Result};

/// Floats that may be infinite: JSON has no infinities, so they are written as the strings
/// "inf" / "-inf" / "nan" (and read from those, from "Infinity"/"-Infinity", or numbers).
mod float_or_inf {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
        if value.is_nan() {
            s.serialize_str("nan")
        } else if value.is_infinite() {
            s.serialize_str(if *value > 0.0 { "inf" } else { "-inf" })
        } else {
            s.serialize_f64(*value)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(v) => Ok(v),
            Raw::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
                "inf" | "+inf" | "infinity" | "+infinity" => Ok(f64::INFINITY),
                "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                other => Err(serde::de::Error::custom(format!("not a number: `{other}`"))),
            },
        }
    }
}

/// A scheduler config struct: the beta fields every class shares (`num_train_timesteps`,
/// `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`, with diffusers' defaults 1000,
/// 0.0001, 0.02, `linear`, none) followed by the listed fields, each with its default.
macro_rules! scheduler_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$field_meta:meta])* pub $field:ident: $ty:ty = $default:expr,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct $name {
            pub num_train_timesteps: usize,
            pub beta_start: f64,
            pub beta_end: f64,
            pub beta_schedule: String,
            pub trained_betas: Option<Vec<f64>>,
            $($(#[$field_meta])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    num_train_timesteps: 1000,
                    beta_start: 0.0001,
                    beta_end: 0.02,
                    beta_schedule: "linear".into(),
                    trained_betas: None,
                    $($field: $default,)*
                }
            }
        }
    };
}

scheduler_config! {
    /// diffusers' `PNDMScheduler` config.
    pub struct PndmConfig {
        pub skip_prk_steps: bool = false,
        pub set_alpha_to_one: bool = false,
        pub prediction_type: String = "epsilon".into(),
        pub timestep_spacing: String = "leading".into(),
        pub steps_offset: i64 = 0,
    }
}

scheduler_config! {
    /// diffusers' `DDIMScheduler` config.
    pub struct DdimConfig {
        pub clip_sample: bool = true,
        pub set_alpha_to_one: bool = true,
        pub steps_offset: i64 = 0,
        pub prediction_type: String = "epsilon".into(),
        pub thresholding: bool = false,
        pub dynamic_thresholding_ratio: f64 = 0.995,
        pub clip_sample_range: f64 = 1.0,
        pub sample_max_value: f64 = 1.0,
        pub timestep_spacing: String = "leading".into(),
        pub rescale_betas_zero_snr: bool = false,
    }
}

scheduler_config! {
    /// diffusers' `DDPMScheduler` config.
    pub struct DdpmConfig {
        pub variance_type: String = "fixed_small".into(),
        pub clip_sample: bool = true,
        pub prediction_type: String = "epsilon".into(),
        pub thresholding: bool = false,
        pub dynamic_thresholding_ratio: f64 = 0.995,
        pub clip_sample_range: f64 = 1.0,
        pub sample_max_value: f64 = 1.0,
        pub timestep_spacing: String = "leading".into(),
        pub steps_offset: i64 = 0,
        pub rescale_betas_zero_snr: bool = false,
    }
}

scheduler_config! {
    /// diffusers' `EulerDiscreteScheduler` config.
    pub struct EulerDiscreteConfig {
        pub prediction_type: String = "epsilon".into(),
        pub interpolation_type: String = "linear".into(),
        pub use_karras_sigmas: Option<bool> = Some(false),
        pub use_exponential_sigmas: Option<bool> = Some(false),
        pub use_beta_sigmas: Option<bool> = Some(false),
        pub sigma_min: Option<f64> = None,
        pub sigma_max: Option<f64> = None,
        pub timestep_spacing: String = "linspace".into(),
        pub timestep_type: String = "discrete".into(),
        pub steps_offset: i64 = 0,
        pub rescale_betas_zero_snr: bool = false,
        pub final_sigmas_type: String = "zero".into(),
    }
}

scheduler_config! {
    /// diffusers' `EulerAncestralDiscreteScheduler` config.
    pub struct EulerAncestralDiscreteConfig {
        pub prediction_type: String = "epsilon".into(),
        pub timestep_spacing: String = "linspace".into(),
        pub steps_offset: i64 = 0,
        pub rescale_betas_zero_snr: bool = false,
    }
}

scheduler_config! {
    /// diffusers' `DPMSolverMultistepScheduler` config.
    pub struct DpmSolverMultistepConfig {
        pub solver_order: usize = 2,
        pub prediction_type: String = "epsilon".into(),
        pub thresholding: bool = false,
        pub dynamic_thresholding_ratio: f64 = 0.995,
        pub sample_max_value: f64 = 1.0,
        pub algorithm_type: String = "dpmsolver++".into(),
        pub solver_type: String = "midpoint".into(),
        pub lower_order_final: bool = true,
        pub euler_at_final: bool = false,
        pub use_karras_sigmas: bool = false,
        pub use_exponential_sigmas: bool = false,
        pub use_beta_sigmas: bool = false,
        pub use_lu_lambdas: bool = false,
        pub use_flow_sigmas: bool = false,
        pub flow_shift: f64 = 1.0,
        pub final_sigmas_type: String = "zero".into(),
        #[serde(with = "float_or_inf")]
        pub lambda_min_clipped: f64 = f64::NEG_INFINITY,
        pub variance_type: Option<String> = None,
        pub timestep_spacing: String = "linspace".into(),
        pub steps_offset: i64 = 0,
        pub rescale_betas_zero_snr: bool = false,
        pub use_dynamic_shifting: bool = false,
        pub time_shift_type: String = "exponential".into(),
        /// Not an `__init__` argument, but diffusers keeps a folder config's `sigma_min` in the
        /// scheduler's config and its Karras and exponential sigmas then use it.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub sigma_min: Option<f64> = None,
        /// As `sigma_min`.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub sigma_max: Option<f64> = None,
    }
}

scheduler_config! {
    /// diffusers' `LCMScheduler` config (whose beta defaults are SD's scaled-linear ones).
    pub struct LcmConfig {
        pub original_inference_steps: usize = 50,
        pub clip_sample: bool = false,
        pub clip_sample_range: f64 = 1.0,
        pub set_alpha_to_one: bool = true,
        pub steps_offset: i64 = 0,
        pub prediction_type: String = "epsilon".into(),
        pub thresholding: bool = false,
        pub dynamic_thresholding_ratio: f64 = 0.995,
        pub sample_max_value: f64 = 1.0,
        pub timestep_spacing: String = "leading".into(),
        pub timestep_scaling: f64 = 10.0,
        pub rescale_betas_zero_snr: bool = false,
    }
}

impl LcmConfig {
    /// The class's own beta defaults differ from the other classes' (0.00085, 0.012,
    /// scaled_linear); apply them where the folder config has no value.
    fn with_class_beta_defaults(mut self, given: &Map<String, Value>) -> Self {
        if !given.contains_key("beta_start") {
            self.beta_start = 0.00085;
        }
        if !given.contains_key("beta_end") {
            self.beta_end = 0.012;
        }
        if !given.contains_key("beta_schedule") {
            self.beta_schedule = "scaled_linear".into();
        }
        self
    }
}

impl DpmSolverMultistepConfig {
    /// What the class's `__init__` rewrites in its own config: the `deis` algorithm becomes
    /// `dpmsolver++`, the UniPC/DEIS solver types become `midpoint`.
    fn normalize(mut self) -> Self {
        if self.algorithm_type == "deis" {
            self.algorithm_type = "dpmsolver++".into();
        }
        if matches!(self.solver_type.as_str(), "logrho" | "bh1" | "bh2") {
            self.solver_type = "midpoint".into();
        }
        self
    }
}

/// The keys of a folder config that a new scheduler class reads: all but `_`-keys and the
/// keys listed in `_use_default_values`.
pub fn effective_config(folder_config: &Value) -> Result<Map<String, Value>> {
    let object = folder_config
        .as_object()
        .ok_or_else(|| Error::InvalidRequest("scheduler config: expected a JSON object".into()))?;
    let defaults: Vec<&str> = object
        .get("_use_default_values")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    Ok(object
        .iter()
        .filter(|(k, _)| !k.starts_with('_') && !defaults.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// A class config from a folder config, with keyword overrides (as `from_config(cfg, **kw)`).
fn config_for<T: DeserializeOwned>(
    class: &str,
    folder_config: &Value,
    overrides: &[(&str, Value)],
) -> Result<T> {
    let mut map = effective_config(folder_config)?;
    for (k, v) in overrides {
        map.insert((*k).to_string(), v.clone());
    }
    serde_json::from_value(Value::Object(map))
        .map_err(|e| Error::InvalidRequest(format!("{class} config: {e}")))
}

/// The schedulers the crate offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    Ddpm,
    Euler,
    EulerAncestral,
    DpmPP2M,
    DpmPP2MKarras,
    /// Latent Consistency Models' sampler (for LCM-distilled U-Nets).
    Lcm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 8] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPP2M,
        SchedulerKind::DpmPP2MKarras,
        SchedulerKind::Lcm,
    ];

    /// The kind named on the command line (`pndm`, `ddim`, `ddpm`, `euler`, `euler-a`,
    /// `dpm++2m`, `dpm++2m-karras`, `lcm`).
    pub fn from_cli_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.cli_name() == name)
            .ok_or_else(|| Error::UnknownScheduler {
                name: name.to_string(),
                known: Self::ALL.map(|k| k.cli_name()).join(", "),
            })
    }

    pub fn cli_name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPP2M => "dpm++2m",
            SchedulerKind::DpmPP2MKarras => "dpm++2m-karras",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// The sampler name AUTOMATIC1111's web UI writes in its PNG parameters.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Ddpm => "DDPM",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPP2M => "DPM++ 2M",
            SchedulerKind::DpmPP2MKarras => "DPM++ 2M Karras",
            SchedulerKind::Lcm => "LCM",
        }
    }

    /// The diffusers class that implements the kind.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmPP2M | SchedulerKind::DpmPP2MKarras => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
        }
    }

    /// The kind of a folder's scheduler (its `_class_name`); a DPM-Solver multistep config
    /// with `use_karras_sigmas` true is [`SchedulerKind::DpmPP2MKarras`].
    pub fn from_diffusers_class(class: &str, config: &Value) -> Result<Self> {
        let kind = match class {
            "PNDMScheduler" => SchedulerKind::Pndm,
            "DDIMScheduler" => SchedulerKind::Ddim,
            "DDPMScheduler" => SchedulerKind::Ddpm,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "LCMScheduler" => SchedulerKind::Lcm,
            "DPMSolverMultistepScheduler" => {
                let karras = effective_config(config)
                    .ok()
                    .and_then(|m| m.get("use_karras_sigmas").and_then(Value::as_bool))
                    .unwrap_or(false);
                if karras {
                    SchedulerKind::DpmPP2MKarras
                } else {
                    SchedulerKind::DpmPP2M
                }
            }
            other => {
                let mut known: Vec<&str> = Self::ALL.map(|k| k.diffusers_class()).to_vec();
                known.dedup();
                return Err(Error::UnknownScheduler {
                    name: other.to_string(),
                    known: format!("{} (diffusers classes)", known.join(", ")),
                });
            }
        };
        Ok(kind)
    }

    /// The keyword arguments the kind forces on `from_config`.
    fn overrides(self) -> Vec<(&'static str, Value)> {
        match self {
            SchedulerKind::DpmPP2M => vec![("use_karras_sigmas", Value::Bool(false))],
            SchedulerKind::DpmPP2MKarras => vec![("use_karras_sigmas", Value::Bool(true))],
            _ => Vec::new(),
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::from_cli_name(s)
    }
}

/// How inference timesteps spread over the training timesteps (`timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    /// Ends at the last training timestep: what SD-Turbo and few-step sampling use.
    Trailing,
}

impl TimestepSpacing {
    pub fn as_str(self) -> &'static str {
        match self {
            TimestepSpacing::Linspace => "linspace",
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linspace" => Ok(TimestepSpacing::Linspace),
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            other => Err(Error::InvalidRequest(format!(
                "unknown timestep spacing `{other}`; known: linspace, leading, trailing"
            ))),
        }
    }
}

/// Options of a run that are not part of the scheduler config.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SchedulerOptions {
    /// DDIM's eta (0: deterministic DDIM; > 0 draws noise at each step). Other kinds ignore it,
    /// as diffusers' pipelines pass it only to schedulers whose `step` takes it.
    pub eta: f64,
    /// Overrides the config's `timestep_spacing`, as
    /// `Kind.from_config(config, timestep_spacing=...)` does.
    pub timestep_spacing: Option<TimestepSpacing>,
}

/// A typed config of one kind.
enum KindConfig {
    Pndm(PndmConfig),
    Ddim(DdimConfig),
    Ddpm(DdpmConfig),
    Euler(EulerDiscreteConfig),
    EulerAncestral(EulerAncestralDiscreteConfig),
    Dpm(DpmSolverMultistepConfig),
    Lcm(LcmConfig),
}

fn kind_config(kind: SchedulerKind, folder_config: &Value) -> Result<KindConfig> {
    let class = kind.diffusers_class();
    let overrides = kind.overrides();
    Ok(match kind {
        SchedulerKind::Pndm => KindConfig::Pndm(config_for(class, folder_config, &overrides)?),
        SchedulerKind::Ddim => KindConfig::Ddim(config_for(class, folder_config, &overrides)?),
        SchedulerKind::Ddpm => KindConfig::Ddpm(config_for(class, folder_config, &overrides)?),
        SchedulerKind::Euler => KindConfig::Euler(config_for(class, folder_config, &overrides)?),
        SchedulerKind::EulerAncestral => {
            KindConfig::EulerAncestral(config_for(class, folder_config, &overrides)?)
        }
        SchedulerKind::DpmPP2M | SchedulerKind::DpmPP2MKarras => {
            let config: DpmSolverMultistepConfig = config_for(class, folder_config, &overrides)?;
            KindConfig::Dpm(config.normalize())
        }
        SchedulerKind::Lcm => {
            let config: LcmConfig = config_for(class, folder_config, &overrides)?;
            KindConfig::Lcm(config.with_class_beta_defaults(&effective_config(folder_config)?))
        }
    })
}

/// The scheduler config diffusers' Stable Diffusion pipelines run `kind` with, for a model
/// folder's scheduler config; pass the result to [`build`].
///
/// `StableDiffusionPipeline.__init__` rewrites the config of the scheduler it is given: a
/// `steps_offset` other than 1 becomes 1 and a `clip_sample` of true becomes false. When
/// `kind` is the folder's own scheduler (same class, and for DPM-Solver the same Karras
/// setting), diffusers runs that rewritten scheduler as it is, class defaults included (a
/// DDIM folder config without `steps_offset` runs with 1, not DDIM's default 0). Any other
/// kind is made with `New.from_config(pipe.scheduler.config)`, which drops the keys that were
/// defaults, so only the keys present in the folder's JSON carry the rewrite.
pub fn stable_diffusion_pipeline_config(
    kind: SchedulerKind,
    folder_config: &Value,
) -> Result<Value> {
    let mut map = effective_config(folder_config)?;
    let same = folder_config
        .get("_class_name")
        .and_then(Value::as_str)
        .and_then(|class| SchedulerKind::from_diffusers_class(class, folder_config).ok())
        == Some(kind);
    if same {
        // Every supported class has `steps_offset`; `clip_sample` is read by the classes that
        // have it and ignored by the others.
        map.insert("steps_offset".into(), Value::from(1));
        map.insert("clip_sample".into(), Value::Bool(false));
    } else {
        if map
            .get("steps_offset")
            .is_some_and(|v| v.as_f64() != Some(1.0))
        {
            map.insert("steps_offset".into(), Value::from(1));
        }
        if map.get("clip_sample") == Some(&Value::Bool(true)) {
            map.insert("clip_sample".into(), Value::Bool(false));
        }
    }
    Ok(Value::Object(map))
}

/// A scheduler of `kind` from a model folder's scheduler config, set to `steps` inference
/// steps: diffusers' `Kind.from_config(folder_config)` then `set_timesteps(steps)`.
pub fn build(
    kind: SchedulerKind,
    folder_config: &Value,
    steps: usize,
    options: &SchedulerOptions,
) -> Result<Box<dyn Scheduler>> {
    if steps == 0 {
        return Err(Error::InvalidRequest(
            "the number of inference steps must be at least 1".into(),
        ));
    }
    if !options.eta.is_finite() || options.eta < 0.0 {
        return Err(Error::InvalidRequest(format!(
            "eta must be a finite number >= 0, not {}",
            options.eta
        )));
    }
    let overridden;
    let folder_config = match options.timestep_spacing {
        Some(spacing) => {
            let mut map = effective_config(folder_config)?;
            map.insert("timestep_spacing".into(), Value::from(spacing.as_str()));
            overridden = Value::Object(map);
            &overridden
        }
        None => folder_config,
    };
    Ok(match kind_config(kind, folder_config)? {
        KindConfig::Lcm(c) => Box::new(Lcm::new(&c, steps)?),
        KindConfig::Pndm(c) => Box::new(Pndm::new(&c, steps)?),
        KindConfig::Ddim(c) => Box::new(Ddim::new(&c, steps, options.eta)?),
        KindConfig::Ddpm(c) => Box::new(Ddpm::new(&c, steps)?),
        KindConfig::Euler(c) => Box::new(EulerDiscrete::new(&c, steps)?),
        KindConfig::EulerAncestral(c) => Box::new(EulerAncestralDiscrete::new(&c, steps)?),
        KindConfig::Dpm(c) => Box::new(DpmSolverMultistep::new(&c, steps)?),
    })
}

/// The config a scheduler of `kind` resolves from a folder config, as diffusers reports it
/// in `Kind.from_config(folder_config).config` (every `__init__` argument; non-finite floats
/// as the strings "inf", "-inf", "nan").
pub fn resolved_config(kind: SchedulerKind, folder_config: &Value) -> Result<Value> {
    let value = match kind_config(kind, folder_config)? {
        KindConfig::Pndm(c) => serde_json::to_value(c),
        KindConfig::Ddim(c) => serde_json::to_value(c),
        KindConfig::Ddpm(c) => serde_json::to_value(c),
        KindConfig::Euler(c) => serde_json::to_value(c),
        KindConfig::EulerAncestral(c) => serde_json::to_value(c),
        KindConfig::Dpm(c) => serde_json::to_value(c),
        KindConfig::Lcm(c) => serde_json::to_value(c),
    };
    value.map_err(|e| Error::InvalidRequest(format!("scheduler config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cli_names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(SchedulerKind::from_cli_name(kind.cli_name()).unwrap(), kind);
        }
        let err = SchedulerKind::from_cli_name("lms").unwrap_err().to_string();
        assert!(
            err.contains("lms") && err.contains("dpm++2m-karras"),
            "{err}"
        );
    }

    #[test]
    fn defaults_listed_as_used_are_dropped() {
        let folder = json!({
            "_class_name": "PNDMScheduler",
            "_use_default_values": ["timestep_spacing"],
            "timestep_spacing": "leading",
            "steps_offset": 1,
        });
        let euler = resolved_config(SchedulerKind::Euler, &folder).unwrap();
        assert_eq!(euler["timestep_spacing"], "linspace");
        assert_eq!(euler["steps_offset"], 1);
        let dpm = resolved_config(SchedulerKind::DpmPP2MKarras, &folder).unwrap();
        assert_eq!(dpm["use_karras_sigmas"], true);
        assert_eq!(dpm["lambda_min_clipped"], "-inf");
    }

    #[test]
    fn classes_map_to_kinds() {
        let karras = json!({"use_karras_sigmas": true});
        assert_eq!(
            SchedulerKind::from_diffusers_class("DPMSolverMultistepScheduler", &karras).unwrap(),
            SchedulerKind::DpmPP2MKarras
        );
        assert_eq!(
            SchedulerKind::from_diffusers_class("DPMSolverMultistepScheduler", &json!({})).unwrap(),
            SchedulerKind::DpmPP2M
        );
        let err = SchedulerKind::from_diffusers_class("LMSDiscreteScheduler", &json!({}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("LMSDiscreteScheduler"), "{err}");
    }

    #[test]
    fn zero_steps_is_an_error() {
        let folder = json!({});
        assert!(matches!(
            build(
                SchedulerKind::Euler,
                &folder,
                0,
                &SchedulerOptions::default()
            ),
            Err(Error::InvalidRequest(_))
        ));
    }
}
