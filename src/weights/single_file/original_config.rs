//! The original training code's yaml for a checkpoint: `--original-config FILE.yaml`, or
//! `NAME.yaml` beside `NAME.safetensors` as A1111 reads it. It says what the weights do not:
//! the prediction type (`model.params.parameterization: "v"`, the SD 2.x 768 models and their
//! fine-tunes) and the layers' layout and schedule ([`yaml_architecture`]). Its U-Net width and
//! text width are checked against the file, so a yaml for another model is an error rather
//! than a silent misreading.

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use super::yaml_architecture::{self, YamlArchitecture};
use crate::error::{Error, Result};

/// What text2img takes from an original config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OriginalConfig {
    /// `epsilon` or `v_prediction`, when the yaml says.
    pub prediction_type: Option<&'static str>,
    /// The U-Net's `model_channels` (its first width).
    pub model_channels: Option<usize>,
    /// The U-Net's `context_dim` (its text width; SGM lists one per level).
    pub context_dim: Option<usize>,
    /// The layers and schedule it describes, when it holds them.
    pub architecture: YamlArchitecture,
}

impl OriginalConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|m| Error::config(path, m))
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not YAML: {e}"))?;
        let root = docs.first().ok_or("an empty YAML file")?;
        let params = &root["model"]["params"];
        if params.is_badvalue() {
            return Err("not an original (LDM/SGM) model config: no `model.params`".into());
        }
        let prediction_type = match &params["parameterization"] {
            Yaml::BadValue | Yaml::Null => None,
            Yaml::String(s) if s == "v" => Some("v_prediction"),
            Yaml::String(s) if s == "eps" => Some("epsilon"),
            other => {
                return Err(format!(
                    "`model.params.parameterization` is {other:?}; text2img runs \"eps\" and \"v\""
                ))
            }
        };
        let unet = yaml_architecture::unet_params(params).map_or(&Yaml::BadValue, |(u, _)| u);
        let int = |y: &Yaml| y.as_i64().and_then(|v| usize::try_from(v).ok());
        let context_dim = match &unet["context_dim"] {
            Yaml::Array(levels) => levels.iter().filter_map(int).max(),
            other => int(other),
        };
        Ok(Self {
            prediction_type,
            model_channels: int(&unet["model_channels"]),
            context_dim,
            architecture: yaml_architecture::read(params)?,
        })
    }

    /// Why this config does not describe a U-Net of first width `channels` reading text of
    /// width `text_width`, if it does not.
    pub fn mismatch(&self, channels: usize, text_width: usize) -> Option<String> {
        let differs = |said: Option<usize>, is: usize| said.is_some_and(|s| s != is);
        (differs(self.model_channels, channels) || differs(self.context_dim, text_width)).then(
            || {
                format!(
                    "describes a U-Net {} wide reading text {} wide; the checkpoint's is {channels} wide reading {text_width}: the yaml is for another model",
                    self.model_channels.map_or("?".into(), |c| c.to_string()),
                    self.context_dim.map_or("?".into(), |c| c.to_string()),
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of the released v2-inference-v.yaml, abridged.
    const SD2_V: &str = r#"
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32 # unused
        in_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_linear_in_transformer: True
        context_dim: 1024
"#;

    const SDXL: &str = r#"
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        model_channels: 320
        context_dim: 2048
"#;

    #[test]
    fn reads_the_prediction_type_and_the_widths() {
        let c = OriginalConfig::parse(SD2_V).unwrap();
        assert_eq!(c.prediction_type, Some("v_prediction"));
        assert_eq!((c.model_channels, c.context_dim), (Some(320), Some(1024)));
        assert_eq!(c.mismatch(320, 1024), None);
        assert!(c.mismatch(320, 768).unwrap().contains("another model"));
        let xl = OriginalConfig::parse(SDXL).unwrap();
        assert_eq!(xl.prediction_type, None);
        assert_eq!(xl.context_dim, Some(2048));
        let eps = OriginalConfig::parse(&SD2_V.replace("\"v\"", "\"eps\"")).unwrap();
        assert_eq!(eps.prediction_type, Some("epsilon"));
        assert!(OriginalConfig::parse(&SD2_V.replace("\"v\"", "\"x0\""))
            .unwrap_err()
            .contains("\"eps\" and \"v\""));
        assert!(OriginalConfig::parse("a: [1, 2")
            .unwrap_err()
            .contains("not YAML"));
        assert!(OriginalConfig::parse("foo: 1")
            .unwrap_err()
            .contains("no `model.params`"));
    }
}
