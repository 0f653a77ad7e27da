//! LoRAs merged into a pipeline's weights as they load: each part's changed weights get
//! `multiplier x delta` added (see [`crate::weights::lora`]), and every module of every LoRA
//! must find its layer somewhere, or the user hears of it.

use std::collections::HashSet;

use super::LoraSpec;

use crate::error::{Error, Result};
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
        let weight = |s: &LoraSpec| match part {
            Part::Unet => s.unet_weight,
            Part::TextEncoder(_) => s.text_weight,
        };
        let set: Vec<(&Lora, f64)> = self.loras.iter().map(|(l, s)| (l, weight(s))).collect();
        let patches = lora::patches(&set, part, &weights.named_shapes())?;
        for (all, found) in self.matched.iter_mut().zip(patches.matched) {
            all.extend(found);
        }
        weights.patch(patches.deltas);
        Ok(())
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
