//! LoRAs merged into a pipeline's weights as they load: each part's changed weights get
//! `multiplier x delta` added (see [`crate::weights::lora`]), and every module of every LoRA
//! must find its layer somewhere, or the user hears of it.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;

use super::LoraSpec;

use crate::error::{Error, Result};
use crate::nn::Layers;
use crate::weights::lora::{self, Lora, Part};
use crate::weights::Weights;

/// The LoRAs of one load, and which of their modules found a layer so far.
pub(crate) struct LoraLoad {
    loras: Vec<(Lora, LoraSpec)>,
    matched: Vec<HashSet<String>>,
}

impl LoraLoad {
    pub fn open(specs: &[LoraSpec]) -> Result<Self> {
        let loras = specs
            .iter()
            .map(|spec| {
                if !(spec.text_weight.is_finite() && spec.unet_weight.is_finite()) {
                    return Err(Error::InvalidRequest(format!(
                        "LoRA {}: the weight must be a number",
                        spec.path.display()
                    )));
                }
                Ok((Lora::load(&spec.path)?, spec.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let matched = vec![HashSet::new(); loras.len()];
        Ok(Self { loras, matched })
    }

    /// Adds the LoRAs' changes to `part`'s weights before they load.
    pub fn patch(&mut self, weights: &mut Weights, part: Part) -> Result<()> {
        if self.loras.is_empty() {
            return Ok(());
        }
        let shapes = weights.named_shapes();
        let original = |name: &str| -> Result<Tensor> {
            let shape = shapes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            Ok(weights
                .get(name, &shape)?
                .to_dtype(candle_core::DType::F32)?)
        };
        let deltas = self.deltas(part, &shapes, &original)?;
        weights.patch(deltas);
        Ok(())
    }

    /// Adds the LoRAs' changes to a loaded model: each changed layer is replaced by a patched
    /// copy, so the tensors it shared with other copies of the model stay as they were.
    pub fn patch_layers(&mut self, model: &mut dyn Layers, part: Part) -> Result<()> {
        if self.loras.is_empty() {
            return Ok(());
        }
        let mut layers = Vec::new();
        model.layers_mut(&mut layers);
        let shapes: Vec<(String, Vec<usize>)> = layers
            .iter()
            .map(|l| (l.name().to_string(), l.shape()))
            .collect();
        let original = |name: &str| -> Result<Tensor> {
            layers
                .iter()
                .find(|l| l.name() == name)
                .map(|l| l.weight())
                .transpose()?
                .ok_or_else(|| Error::InvalidRequest(format!("no layer `{name}`")))
        };
        let deltas = self.deltas(part, &shapes, &original)?;
        for layer in &mut layers {
            if let Some(delta) = deltas.get(layer.name()) {
                layer.patch(delta)?;
            }
        }
        Ok(())
    }

    /// The summed change of every LoRA to each of the named weights of `part`.
    fn deltas(
        &mut self,
        part: Part,
        shapes: &[(String, Vec<usize>)],
        original: &dyn Fn(&str) -> Result<Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        let weight = |s: &LoraSpec| match part {
            Part::Unet => s.unet_weight,
            Part::TextEncoder(_) => s.text_weight,
        };
        let set: Vec<(&Lora, f64)> = self.loras.iter().map(|(l, s)| (l, weight(s))).collect();
        let patches = lora::patches(&set, part, shapes, original)?;
        for (all, found) in self.matched.iter_mut().zip(patches.matched) {
            all.extend(found);
        }
        Ok(patches.deltas)
    }

    /// Warnings for modules that matched no layer; an error for a LoRA none of whose modules
    /// did (it was made for another architecture).
    pub fn finish(self) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        for ((lora, _), matched) in self.loras.iter().zip(&self.matched) {
            let unmatched: Vec<&str> = lora.keys().filter(|k| !matched.contains(*k)).collect();
            if matched.is_empty() {
                return Err(Error::config(
                    &lora.path,
                    format!(
                        "none of the LoRA's {} modules is a layer of this model (made for another architecture?); e.g. {}",
                        lora.len(),
                        unmatched.iter().take(3).copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if !unmatched.is_empty() {
                warnings.push(format!(
                    "LoRA {}: {} of its {} modules match no layer and are left out, e.g. {}",
                    lora.name,
                    unmatched.len(),
                    lora.len(),
                    unmatched
                        .iter()
                        .take(3)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Ok(warnings)
    }
}
