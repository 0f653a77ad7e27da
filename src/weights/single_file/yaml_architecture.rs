//! The architecture an original (LDM/SGM) yaml describes, as the diffusers config files a
//! folder would carry: the U-Net from `unet_config` (SGM: `network_config`), the VAE from
//! `first_stage_config.params.ddconfig` and `scale_factor`, the noise schedule from
//! `linear_start` / `linear_end` / `timesteps`. This is how A1111 builds a checkpoint's model
//! (from its yaml), so a checkpoint of a non-released architecture loads with its yaml alone.
//!
//! The mapping follows the original code and agrees with diffusers'
//! `create_unet_diffusers_config_from_ldm` on every released yaml. Where the original code
//! has a constant no yaml can change (32 groups in every GroupNorm), the config says so
//! explicitly. One difference: a yaml with `num_head_channels` but no linear projection gets
//! `channels / num_head_channels` heads per level, as the original code builds it (diffusers
//! falls back to 8 heads there).

use serde_json::{json, Map, Value};
use yaml_rust2::Yaml;

/// The config files (by their path in a diffusers folder) the yaml describes, each as the
/// keys it sets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct YamlArchitecture {
    pub unet: Option<Map<String, Value>>,
    pub vae: Option<Map<String, Value>>,
    pub scheduler: Option<Map<String, Value>>,
}

impl YamlArchitecture {
    /// The files described, as (diffusers path, keys).
    pub fn files(&self) -> Vec<(&'static str, &Map<String, Value>)> {
        [
            ("unet/config.json", &self.unet),
            ("vae/config.json", &self.vae),
            ("scheduler/scheduler_config.json", &self.scheduler),
        ]
        .into_iter()
        .filter_map(|(file, keys)| keys.as_ref().map(|k| (file, k)))
        .collect()
    }
}

/// Every GroupNorm of the original U-Net and VAE (`normalization`, `Normalize`) has 32 groups.
const GROUPS: usize = 32;
/// The VAE scaling factor the original code defaults to.
const DEFAULT_SCALE_FACTOR: f64 = 0.18215;

/// Reads the architecture under `model.params`. A section is read only when it is complete
/// enough for the original code to build its model from (a U-Net's `num_res_blocks` and
/// `attention_resolutions`, a VAE's `ddconfig`); a yaml holding less (only the
/// parameterization, say) describes no layers.
pub fn read(params: &Yaml) -> Result<YamlArchitecture, String> {
    let unet = match unet_params(params) {
        Some((u, section)) if has(u, "num_res_blocks") && has(u, "attention_resolutions") => {
            Some(unet(u).map_err(|e| format!("`model.params.{section}.params`: {e}"))?)
        }
        _ => None,
    };
    let ddconfig = &params["first_stage_config"]["params"]["ddconfig"];
    let vae = match ddconfig.as_hash() {
        Some(_) => Some(
            vae(ddconfig, params)
                .map_err(|e| format!("`model.params.first_stage_config.params.ddconfig`: {e}"))?,
        ),
        None => None,
    };
    let scheduler = (unet.is_some() || vae.is_some())
        .then(|| schedule(params))
        .transpose()?;
    Ok(YamlArchitecture {
        unet,
        vae,
        scheduler,
    })
}

/// The U-Net's parameters under `model.params` and the section holding them: SD 1.x/2.x
/// name it `unet_config`, SGM (SDXL) `network_config`.
pub fn unet_params(params: &Yaml) -> Option<(&Yaml, &'static str)> {
    ["unet_config", "network_config"]
        .into_iter()
        .map(|section| (&params[section]["params"], section))
        .find(|(p, _)| p.as_hash().is_some())
}

fn has(y: &Yaml, key: &str) -> bool {
    !matches!(y[key], Yaml::BadValue | Yaml::Null)
}

fn count(y: &Yaml, key: &str) -> Result<usize, String> {
    match &y[key] {
        Yaml::Integer(v) if *v >= 0 => Ok(*v as usize),
        Yaml::BadValue | Yaml::Null => Err(format!("no `{key}`")),
        other => Err(format!("`{key}` is {}, not a count", show(other))),
    }
}

fn number(y: &Yaml, key: &str) -> Result<Option<f64>, String> {
    match &y[key] {
        Yaml::BadValue | Yaml::Null => Ok(None),
        Yaml::Integer(v) => Ok(Some(*v as f64)),
        Yaml::Real(_) => y[key]
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("`{key}` is not a number")),
        other => Err(format!("`{key}` is {}, not a number", show(other))),
    }
}

/// A count or a list of counts (`[1, 2, 4]`).
fn counts(y: &Yaml, key: &str) -> Result<Option<Vec<usize>>, String> {
    match &y[key] {
        Yaml::BadValue | Yaml::Null => Ok(None),
        Yaml::Array(items) => items
            .iter()
            .map(|i| match i {
                Yaml::Integer(v) if *v >= 0 => Ok(*v as usize),
                other => Err(format!("`{key}` holds {}, not a count", show(other))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Yaml::Integer(_) => Ok(Some(vec![count(y, key)?])),
        other => Err(format!("`{key}` is {}, not a list of counts", show(other))),
    }
}

fn show(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => format!("\"{s}\""),
        Yaml::Integer(v) => v.to_string(),
        Yaml::Real(v) => v.clone(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Array(_) => "a list".into(),
        Yaml::Hash(_) => "a mapping".into(),
        _ => "empty".into(),
    }
}

fn flag(y: &Yaml, key: &str) -> Result<bool, String> {
    match &y[key] {
        Yaml::BadValue | Yaml::Null => Ok(false),
        Yaml::Boolean(b) => Ok(*b),
        other => Err(format!("`{key}` is {}, not true or false", show(other))),
    }
}

/// One value for every level: an integer, or a list whose entries agree.
fn one_for_all(y: &Yaml, key: &str, what: &str) -> Result<Option<usize>, String> {
    Ok(match counts(y, key)? {
        None => None,
        Some(list) => match list.as_slice() {
            [] => return Err(format!("`{key}` is an empty list")),
            [first, rest @ ..] if rest.iter().all(|v| v == first) => Some(*first),
            _ => {
                return Err(format!(
                "`{key}` {list:?} differs between levels; text2img's U-Net has one {what} for all"
            ))
            }
        },
    })
}

fn unet(u: &Yaml) -> Result<Map<String, Value>, String> {
    let model_channels = count(u, "model_channels")?;
    // The original code's default levels.
    let channel_mult = counts(u, "channel_mult")?.unwrap_or_else(|| vec![1, 2, 4, 8]);
    if channel_mult.is_empty() {
        return Err("`channel_mult` is an empty list".into());
    }
    let widths: Vec<usize> = channel_mult.iter().map(|m| model_channels * m).collect();
    let attention = counts(u, "attention_resolutions")?.unwrap_or_default();
    // Level i works at 2^i times the input's downsampling; a level attends when its factor
    // is listed. Levels count down on the way up.
    let attends = |level: usize| attention.contains(&(1 << level));
    let levels = widths.len();
    let down: Vec<&str> = (0..levels)
        .map(|l| match attends(l) {
            true => "CrossAttnDownBlock2D",
            false => "DownBlock2D",
        })
        .collect();
    let up: Vec<&str> = (0..levels)
        .rev()
        .map(|l| match attends(l) {
            true => "CrossAttnUpBlock2D",
            false => "UpBlock2D",
        })
        .collect();
    let layers = one_for_all(u, "num_res_blocks", "number of resnets per level")?
        .ok_or("no `num_res_blocks`")?;

    // Heads: `num_head_channels` fixes each head's width (heads = level width / it), else
    // `num_heads` fixes their number. diffusers' `attention_head_dim` is the number of heads.
    let head_channels = match number(u, "num_head_channels")? {
        Some(c) if c > 0.0 => Some(c as usize),
        _ => None,
    };
    let heads: Value = match (head_channels, number(u, "num_heads")?) {
        (Some(c), _) => {
            if let Some(w) = widths.iter().find(|w| *w % c != 0) {
                return Err(format!(
                    "a level {w} wide does not split into heads of `num_head_channels` {c}"
                ));
            }
            json!(widths.iter().map(|w| w / c).collect::<Vec<_>>())
        }
        (None, Some(n)) if n >= 1.0 => json!(n as usize),
        _ => return Err("neither `num_heads` nor `num_head_channels` is set".into()),
    };

    let depth: Value = match counts(u, "transformer_depth")? {
        None => json!(1),
        Some(list) if matches!(u["transformer_depth"], Yaml::Integer(_)) => json!(list[0]),
        Some(list) if list.len() == levels => json!(list),
        Some(list) => {
            return Err(format!(
                "`transformer_depth` lists {} levels, `channel_mult` {levels}",
                list.len()
            ))
        }
    };
    if let (Some(middle), Some(list)) = (
        number(u, "transformer_depth_middle")?,
        counts(u, "transformer_depth")?,
    ) {
        if Some(&(middle as usize)) != list.last() {
            return Err(format!(
                "`transformer_depth_middle` {middle} differs from the last level's depth; text2img's middle block has the last level's"
            ));
        }
    }
    let context = match counts(u, "context_dim")? {
        None => None,
        Some(list) => match list.as_slice() {
            [first, rest @ ..] if rest.iter().all(|v| v == first) => Some(*first),
            _ => return Err(format!("`context_dim` {list:?} differs between levels")),
        },
    };
    if let Yaml::Array(flags) = &u["disable_self_attentions"] {
        if flags.iter().any(|f| f.as_bool() == Some(true)) {
            return Err(
                "`disable_self_attentions`: blocks without self-attention are not supported".into(),
            );
        }
    }

    let mut config = Map::new();
    config.insert("in_channels".into(), json!(count(u, "in_channels")?));
    config.insert("out_channels".into(), json!(count(u, "out_channels")?));
    config.insert("block_out_channels".into(), json!(widths));
    config.insert("down_block_types".into(), json!(down));
    config.insert("up_block_types".into(), json!(up));
    config.insert("layers_per_block".into(), json!(layers));
    config.insert("attention_head_dim".into(), heads);
    config.insert("transformer_layers_per_block".into(), depth);
    config.insert("cross_attention_dim".into(), json!(context));
    config.insert(
        "use_linear_projection".into(),
        json!(flag(u, "use_linear_in_transformer")?),
    );
    config.insert("norm_num_groups".into(), json!(GROUPS));
    // SDXL's size and crop conditioning: `num_classes: sequential` with `adm_in_channels`
    // (six 256-wide time ids plus the pooled text embedding).
    let (mut embed_type, mut time_dim, mut adm) = (Value::Null, Value::Null, Value::Null);
    match &u["num_classes"] {
        Yaml::BadValue | Yaml::Null => {}
        Yaml::String(s) if s == "sequential" => {
            embed_type = json!("text_time");
            time_dim = json!(256);
            adm = json!(count(u, "adm_in_channels")?);
        }
        other => {
            return Err(format!(
                "`num_classes` {}: class-conditioned U-Nets are not supported",
                show(other)
            ))
        }
    }
    config.insert("addition_embed_type".into(), embed_type);
    config.insert("addition_time_embed_dim".into(), time_dim);
    config.insert("projection_class_embeddings_input_dim".into(), adm);
    config.insert("class_embed_type".into(), Value::Null);
    Ok(config)
}

fn vae(dd: &Yaml, params: &Yaml) -> Result<Map<String, Value>, String> {
    let ch = count(dd, "ch")?;
    let mult = counts(dd, "ch_mult")?.ok_or("no `ch_mult`")?;
    if mult.is_empty() {
        return Err("`ch_mult` is an empty list".into());
    }
    if counts(dd, "attn_resolutions")?.is_some_and(|a| !a.is_empty()) {
        return Err(
            "`attn_resolutions` is not empty: attention outside the middle block is not supported"
                .into(),
        );
    }
    if matches!(dd["double_z"], Yaml::Boolean(false)) {
        return Err(
            "`double_z: false`: a VAE whose encoder gives no variance is not supported".into(),
        );
    }
    let levels = mult.len();
    let mut config = Map::new();
    config.insert("in_channels".into(), json!(count(dd, "in_channels")?));
    config.insert("out_channels".into(), json!(count(dd, "out_ch")?));
    config.insert(
        "block_out_channels".into(),
        json!(mult.iter().map(|m| ch * m).collect::<Vec<_>>()),
    );
    config.insert(
        "down_block_types".into(),
        json!(vec!["DownEncoderBlock2D"; levels]),
    );
    config.insert(
        "up_block_types".into(),
        json!(vec!["UpDecoderBlock2D"; levels]),
    );
    config.insert("latent_channels".into(), json!(count(dd, "z_channels")?));
    config.insert(
        "layers_per_block".into(),
        json!(count(dd, "num_res_blocks")?),
    );
    config.insert("norm_num_groups".into(), json!(GROUPS));
    let scale = number(params, "scale_factor")
        .map_err(|e| format!("{e} (in `model.params`)"))?
        .unwrap_or(DEFAULT_SCALE_FACTOR);
    config.insert("scaling_factor".into(), json!(scale));
    Ok(config)
}

/// The training noise schedule: LDM's `linear` is linear in sqrt(beta), diffusers'
/// `scaled_linear`. SGM keeps it under its denoiser's discretization, with the same defaults.
fn schedule(params: &Yaml) -> Result<Map<String, Value>, String> {
    let sgm = &params["denoiser_config"]["params"]["discretization_config"]["params"];
    let from = |key: &str, default: f64| -> Result<f64, String> {
        let at_top = number(params, key).map_err(|e| format!("{e} (in `model.params`)"))?;
        let in_sgm = number(sgm, key).map_err(|e| format!("{e} (in the discretization)"))?;
        Ok(at_top.or(in_sgm).unwrap_or(default))
    };
    match &params["beta_schedule"] {
        Yaml::BadValue | Yaml::Null => {}
        Yaml::String(s) if s == "linear" => {}
        other => {
            return Err(format!(
                "`model.params.beta_schedule` {}: only the \"linear\" schedule of the released models is supported",
                show(other)
            ))
        }
    }
    let timesteps = match number(params, "timesteps")? {
        Some(t) if t >= 1.0 && t.fract() == 0.0 => t as usize,
        Some(t) => return Err(format!("`model.params.timesteps` {t} is not a step count")),
        None => 1000,
    };
    let mut config = Map::new();
    config.insert("beta_start".into(), json!(from("linear_start", 0.00085)?));
    config.insert("beta_end".into(), json!(from("linear_end", 0.012)?));
    config.insert("beta_schedule".into(), json!("scaled_linear"));
    config.insert("num_train_timesteps".into(), json!(timesteps));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::YamlLoader;

    const TINY: &str = "
model:
  params:
    linear_start: 0.001
    unet_config:
      params:
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1 ]
        num_res_blocks: 1
        channel_mult: [ 1, 2 ]
        num_heads: 2
        context_dim: 32
    first_stage_config:
      params:
        ddconfig:
          z_channels: 4
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1]
          num_res_blocks: 1
          attn_resolutions: []
";

    fn read_text(text: &str) -> Result<YamlArchitecture, String> {
        let docs = YamlLoader::load_from_str(text).unwrap();
        read(&docs[0]["model"]["params"])
    }

    #[test]
    fn reads_levels_heads_and_the_schedule() {
        let a = read_text(TINY).unwrap();
        let unet = a.unet.unwrap();
        assert_eq!(
            unet["down_block_types"],
            json!(["CrossAttnDownBlock2D", "DownBlock2D"])
        );
        assert_eq!(
            unet["up_block_types"],
            json!(["UpBlock2D", "CrossAttnUpBlock2D"])
        );
        assert_eq!(unet["attention_head_dim"], json!(2));
        assert_eq!(a.vae.unwrap()["scaling_factor"], json!(0.18215));
        let s = a.scheduler.unwrap();
        assert_eq!(
            (s["beta_start"].clone(), s["beta_end"].clone()),
            (json!(0.001), json!(0.012))
        );
        // Heads of a fixed width: the original code's count per level.
        let per_width = TINY.replace("num_heads: 2", "num_head_channels: 16");
        let unet = read_text(&per_width).unwrap().unet.unwrap();
        assert_eq!(unet["attention_head_dim"], json!([2, 4]));
        // Only a parameterization: no layers, no schedule.
        let bare = read_text("model:\n  params:\n    parameterization: \"v\"\n").unwrap();
        assert_eq!(bare, YamlArchitecture::default());
    }

    #[test]
    fn what_the_layers_cannot_run_is_refused_naming_the_key() {
        for (from, to, says) in [
            (
                "num_res_blocks: 1\n        channel",
                "num_res_blocks: [1, 2]\n        channel",
                "`num_res_blocks` [1, 2] differs",
            ),
            (
                "attn_resolutions: []",
                "attn_resolutions: [16]",
                "`attn_resolutions`",
            ),
            (
                "num_heads: 2",
                "num_classes: 10\n        num_heads: 2",
                "class-conditioned",
            ),
            (
                "num_heads: 2",
                "num_head_channels: 24",
                "heads of `num_head_channels` 24",
            ),
            ("num_heads: 2", "legacy: False", "neither `num_heads`"),
            (
                "model_channels: 32",
                "model_channels: wide",
                "`model_channels` is \"wide\"",
            ),
            (
                "linear_start: 0.001",
                "beta_schedule: cosine",
                "only the \"linear\" schedule",
            ),
            ("ch: 32", "ch: -1", "`ch` is -1"),
        ] {
            assert!(TINY.contains(from), "{from}");
            let err = read_text(&TINY.replace(from, to)).unwrap_err();
            assert!(err.contains(says), "{to}: {err}");
        }
    }
}
