//! LoRA files: low-rank (and LoHa/LoKr) changes to a model's weights, merged into them as
//! they load (`W + multiplier x delta`), so generating costs nothing more.
//!
//! Formats, by their tensor names:
//! - kohya (`lora_unet_*`, `lora_te_*`, SDXL `lora_te1_*` / `lora_te2_*`): a module path with
//!   `_` for `.`, then `.lora_down.weight` / `.lora_up.weight` / `.alpha` (LoRA, and LoCon for
//!   convolutions), `.hada_w1_a` ... (LoHa) or `.lokr_w1` ... (LoKr);
//! - PEFT / diffusers (`unet.*`, `text_encoder.*`, `text_encoder_2.*`): `.lora_A.weight` and
//!   `.lora_B.weight` (scale 1 unless the file has an `.alpha`).
//!
//! delta = up . down x alpha / rank for LoRA (convolutions: the kernels' products); LoHa:
//! (w1_a . w1_b) * (w2_a . w2_b) x alpha / rank; LoKr: kron(w1, w2) (each factor whole or a
//! product of two), x alpha / rank when factored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::Weights;

/// One LoRA file's adapters, by the module key they change.
pub struct Lora {
    pub name: String,
    pub path: PathBuf,
    /// Module key (`lora_unet_down_blocks_0_...` or `unet.down_blocks.0....`) -> its tensors
    /// by suffix (`lora_down.weight`, `alpha`, ...).
    modules: BTreeMap<String, HashMap<String, Tensor>>,
}

/// The parts of a pipeline a LoRA may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Unet,
    /// Text encoder 0 or 1 (SDXL's second).
    TextEncoder(usize),
}

const SUFFIXES: &[&str] = &[
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "lora_A.weight",
    "lora_B.weight",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "alpha",
    "dora_scale",
    "lora_magnitude_vector.weight",
    "lora_magnitude_vector",
];

impl Lora {
    pub fn load(path: &Path) -> Result<Self> {
        let name = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let weights = Weights::open_single(path, &["pt", "bin", "ckpt"], &Device::Cpu)?
            .ok_or_else(|| {
                Error::config(path, "not a LoRA file: expected .safetensors (or .pt/.bin)")
            })?;
        let mut modules: BTreeMap<String, HashMap<String, Tensor>> = BTreeMap::new();
        let mut other = Vec::new();
        for (stored, tensor) in weights.stored_tensors()? {
            match SUFFIXES
                .iter()
                .find(|s| stored.len() > s.len() && stored.ends_with(&format!(".{s}")))
            {
                Some(suffix) => {
                    let module = stored[..stored.len() - suffix.len() - 1].to_string();
                    modules
                        .entry(module)
                        .or_default()
                        .insert(suffix.to_string(), tensor.to_dtype(DType::F32)?);
                }
                None => other.push(stored),
            }
        }
        if modules.is_empty() {
            other.truncate(3);
            return Err(Error::config(
                path,
                format!("not a LoRA: no lora_down/lora_up, lora_A/lora_B, LoHa or LoKr tensors (found {})", other.join(", ")),
            ));
        }
        Ok(Self {
            name,
            path: path.to_path_buf(),
            modules,
        })
    }

    /// How many modules the file changes.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The module keys, as stored.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// What one module adds to its weight (of `shape`) at `multiplier`. A DoRA module
    /// (`dora_scale`) rescales the changed weight's norms, so its change depends on the
    /// weight itself (`original`), as A1111 and ComfyUI merge it:
    /// multiplier x (dora_scale x (W + D) / ||W + D|| - W), the norm per input channel when
    /// dora_scale is (1, in, ...), per output channel when it is (out, 1, ...).
    fn change(
        &self,
        key: &str,
        shape: &[usize],
        multiplier: f64,
        original: &dyn Fn() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let delta = self.delta(key, shape)?;
        let module = &self.modules[key];
        if let Some(magnitude) = module
            .get("lora_magnitude_vector")
            .or(module.get("lora_magnitude_vector.weight"))
        {
            return self.peft_dora(key, shape, &delta, magnitude, multiplier, original);
        }
        let Some(scale) = self.modules[key].get("dora_scale") else {
            return Ok((delta * multiplier)?);
        };
        let w = original()?.to_dtype(DType::F32)?;
        let merged = (&w + &delta)?;
        let (out, inp) = (shape[0], shape.get(1).copied().unwrap_or(1));
        let ones = vec![1usize; shape.len().saturating_sub(1)];
        let on_output = scale.dim(0)? == out && scale.elem_count() == out;
        let norm = if on_output {
            let mut s = vec![out];
            s.extend(&ones);
            merged
                .reshape((out, ()))?
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .reshape(s)?
        } else {
            let mut s = vec![1, inp];
            s.extend(&ones[1..]);
            merged
                .transpose(0, 1)?
                .contiguous()?
                .reshape((inp, ()))?
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .reshape(s)?
        };
        if scale.elem_count() != norm.elem_count() {
            return Err(Error::config(
                &self.path,
                format!(
                    "`{key}`: dora_scale has shape {:?}; the weight {shape:?} needs ({out}, 1) or (1, {inp})",
                    scale.dims()
                ),
            ));
        }
        let scale = scale.reshape(norm.dims())?;
        let decomposed = merged.broadcast_mul(&scale.broadcast_div(&norm)?)?;
        Ok(((decomposed - w)? * multiplier)?)
    }

    /// PEFT's DoRA (`lora_magnitude_vector`, one value per output channel), merged as PEFT
    /// merges it: W' = m / ||W + multiplier x D|| x (W + multiplier x D), the norm per output
    /// channel; the multiplier scales the low-rank part inside the norm.
    fn peft_dora(
        &self,
        key: &str,
        shape: &[usize],
        delta: &Tensor,
        magnitude: &Tensor,
        multiplier: f64,
        original: &dyn Fn() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let out = shape[0];
        if magnitude.elem_count() != out {
            return Err(Error::config(
                &self.path,
                format!(
                    "`{key}`: lora_magnitude_vector has {} values; the weight {shape:?} has {out} output channels",
                    magnitude.elem_count()
                ),
            ));
        }
        let w = original()?.to_dtype(DType::F32)?;
        let merged = (&w + (delta * multiplier)?)?;
        let mut per_channel = vec![out];
        per_channel.extend(vec![1usize; shape.len() - 1]);
        let norm = merged
            .reshape((out, ()))?
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .reshape(per_channel.as_slice())?;
        let magnitude = magnitude.reshape(per_channel.as_slice())?;
        let decomposed = merged.broadcast_mul(&magnitude.broadcast_div(&norm)?)?;
        Ok((decomposed - w)?)
    }

    /// The change one module's weight (of `shape`) gets at multiplier 1.
    fn delta(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = &self.modules[key];
        let get = |s: &str| t.get(s);
        let bad = |m: String| Error::config(&self.path, format!("`{key}`: {m}"));
        let alpha = get("alpha")
            .map(|a| {
                a.flatten_all()
                    .and_then(|a| a.get(0))
                    .and_then(|a| a.to_scalar::<f32>())
            })
            .transpose()?;
        let product = |up: &Tensor, down: &Tensor| -> Result<Tensor> {
            // (out, rank[, 1, 1]) . (rank, in[, kh, kw]), as matrices.
            let up2 = up.flatten_from(1)?;
            let down2 = down.flatten_from(1)?;
            Ok(up2.matmul(&down2)?)
        };
        let (delta, rank) = if let (Some(down), Some(up)) = (
            get("lora_down.weight").or(get("lora_A.weight")),
            get("lora_up.weight").or(get("lora_B.weight")),
        ) {
            match get("lora_mid.weight") {
                // LyCORIS' LoCon with a middle kernel (CP/Tucker decomposition): the delta's
                // (kh, kw) slice is up . mid[:, :, kh, kw] . down.
                Some(mid) => (cp_product(up, mid, down)?, down.dim(0)?),
                None => (product(up, down)?, down.dim(0)?),
            }
        } else if let (Some(a1), Some(b1), Some(a2), Some(b2)) = (
            get("hada_w1_a"),
            get("hada_w1_b"),
            get("hada_w2_a"),
            get("hada_w2_b"),
        ) {
            let rank = b1.dim(0)?;
            (product(a1, b1)?.mul(&product(a2, b2)?)?, rank)
        } else {
            let factor = |whole: &str, a: &str, b: &str| -> Result<(Tensor, Option<usize>)> {
                match (get(whole), get(a), get(b)) {
                    (Some(w), _, _) => Ok((w.clone(), None)),
                    (None, Some(a), Some(b)) => Ok((product(a, b)?, Some(b.dim(0)?))),
                    _ => Err(bad(format!("no {whole} (or {a} and {b})"))),
                }
            };
            let (w1, r1) = factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?;
            let (w2, r2) = factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?;
            let w2 = w2.flatten_from(1)?;
            let delta = kron(&w1.flatten_from(1)?, &w2)?;
            // LyCORIS scales a LoKr by alpha / rank only where a factor is a product.
            (delta, r1.or(r2).unwrap_or(0))
        };
        let scale = match (alpha, rank) {
            (Some(a), r) if r > 0 => f64::from(a) / r as f64,
            _ => 1.0,
        };
        let count: usize = shape.iter().product();
        if delta.elem_count() != count {
            return Err(bad(format!(
                "changes a weight of {} values, the model's has shape {shape:?} (a LoRA for another model?)",
                delta.elem_count()
            )));
        }
        Ok((delta.reshape(shape)? * scale)?)
    }
}

/// `einsum("n m k l, i n, m j -> i j k l", mid, up, down)`: the LoCon middle kernel's delta,
/// (out, in, kh, kw).
fn cp_product(up: &Tensor, mid: &Tensor, down: &Tensor) -> Result<Tensor> {
    let up = up.flatten_from(1)?; // (out, r)
    let down = down.flatten_from(1)?; // (r, in)
    let (r_up, r_down, kh, kw) = mid.dims4()?;
    let (out, inp) = (up.dim(0)?, down.dim(1)?);
    let k = kh * kw;
    // (kh, kw, r, r) as a batch of k matrices.
    let mid = mid
        .permute((2, 3, 0, 1))?
        .contiguous()?
        .reshape((k, r_up, r_down))?;
    let left = up
        .unsqueeze(0)?
        .broadcast_as((k, out, r_up))?
        .contiguous()?;
    let right = down
        .unsqueeze(0)?
        .broadcast_as((k, r_down, inp))?
        .contiguous()?;
    let slices = left.matmul(&mid)?.matmul(&right)?; // (k, out, in)
    Ok(slices
        .reshape((kh, kw, out, inp))?
        .permute((2, 3, 0, 1))?
        .contiguous()?)
}

/// The Kronecker product of two matrices.
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ar, ac) = a.dims2()?;
    let (br, bc) = b.dims2()?;
    let out = a
        .reshape((ar, 1, ac, 1))?
        .broadcast_mul(&b.reshape((1, br, 1, bc))?)?;
    Ok(out.reshape((ar * br, ac * bc))?)
}

/// The U-Net's layout in the original (LDM/SGM) naming, read from its weights' names: the
/// resnets per down block, and which up blocks have attentions.
struct UnetLayout {
    layers_per_block: usize,
    up_with_attention: std::collections::HashSet<usize>,
}

impl UnetLayout {
    fn of(weights: &[(String, Vec<usize>)]) -> Self {
        let index_after = |name: &str, prefix: &str| -> Option<usize> {
            name.strip_prefix(prefix)?.split('.').next()?.parse().ok()
        };
        let layers_per_block = weights
            .iter()
            .filter_map(|(n, _)| index_after(n, "down_blocks.0.resnets."))
            .max()
            .map_or(2, |j| j + 1);
        let up_with_attention = weights
            .iter()
            .filter(|(n, _)| n.contains(".attentions."))
            .filter_map(|(n, _)| index_after(n, "up_blocks."))
            .collect();
        Self {
            layers_per_block,
            up_with_attention,
        }
    }

    /// A diffusers U-Net module path in the original naming (`input_blocks.4.1...`), as
    /// kohya names SDXL LoRA modules; `None` for paths outside the mapping.
    fn original_name(&self, module: &str) -> Option<String> {
        let p: Vec<&str> = module.split('.').collect();
        let lpb = self.layers_per_block;
        let rest = |from: usize| p.get(from..).map(|r| r.join(".")).unwrap_or_default();
        let resnet = |tail: &str| -> Option<String> {
            let (head, leaf) = tail.split_once('.').unwrap_or((tail, ""));
            let new = match head {
                "norm1" => "in_layers.0",
                "conv1" => "in_layers.2",
                "time_emb_proj" => "emb_layers.1",
                "norm2" => "out_layers.0",
                "conv2" => "out_layers.3",
                "conv_shortcut" => "skip_connection",
                _ => return None,
            };
            Some(if leaf.is_empty() {
                new.to_string()
            } else {
                format!("{new}.{leaf}")
            })
        };
        let num = |i: usize| -> Option<usize> { p.get(i)?.parse().ok() };
        Some(match *p.first()? {
            "conv_in" => format!("input_blocks.0.0{}", dotted(&rest(1))),
            "conv_out" => format!("out.2{}", dotted(&rest(1))),
            "time_embedding" | "add_embedding" => {
                let slot = match *p.get(1)? {
                    "linear_1" => "0",
                    "linear_2" => "2",
                    _ => return None,
                };
                let head = if p[0] == "time_embedding" {
                    "time_embed"
                } else {
                    "label_emb.0"
                };
                format!("{head}.{slot}{}", dotted(&rest(2)))
            }
            "down_blocks" => {
                let (b, j) = (num(1)?, num(3).unwrap_or(0));
                match *p.get(2)? {
                    "resnets" => format!(
                        "input_blocks.{}.0.{}",
                        1 + b * (lpb + 1) + j,
                        resnet(&rest(4))?
                    ),
                    "attentions" => {
                        format!(
                            "input_blocks.{}.1{}",
                            1 + b * (lpb + 1) + j,
                            dotted(&rest(4))
                        )
                    }
                    "downsamplers" => {
                        format!(
                            "input_blocks.{}.0.op{}",
                            (b + 1) * (lpb + 1),
                            dotted(&rest(5))
                        )
                    }
                    _ => return None,
                }
            }
            "mid_block" => match *p.get(1)? {
                "resnets" => format!("middle_block.{}.{}", 2 * num(2)?, resnet(&rest(3))?),
                "attentions" => format!("middle_block.1{}", dotted(&rest(3))),
                _ => return None,
            },
            "up_blocks" => {
                let (b, j) = (num(1)?, num(3).unwrap_or(0));
                match *p.get(2)? {
                    "resnets" => {
                        format!(
                            "output_blocks.{}.0.{}",
                            b * (lpb + 1) + j,
                            resnet(&rest(4))?
                        )
                    }
                    "attentions" => {
                        format!("output_blocks.{}.1{}", b * (lpb + 1) + j, dotted(&rest(4)))
                    }
                    "upsamplers" => {
                        let slot = if self.up_with_attention.contains(&b) {
                            2
                        } else {
                            1
                        };
                        format!(
                            "output_blocks.{}.{slot}.conv{}",
                            b * (lpb + 1) + lpb,
                            dotted(&rest(5))
                        )
                    }
                    _ => return None,
                }
            }
            _ => return None,
        })
    }
}

/// `.rest`, or nothing for an empty rest.
fn dotted(rest: &str) -> String {
    if rest.is_empty() {
        String::new()
    } else {
        format!(".{rest}")
    }
}

/// The names a module of `part` goes by in LoRA files: kohya's (dots as underscores, after
/// `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_`; for the U-Net also in the original
/// naming, as kohya's SDXL LoRAs are) and PEFT's (`unet.` ...).
fn module_keys(part: Part, module: &str, unet: Option<&UnetLayout>) -> Vec<String> {
    let flat = module.replace('.', "_");
    match part {
        Part::Unet => {
            let mut keys = vec![format!("lora_unet_{flat}"), format!("unet.{module}")];
            if let Some(original) = unet.and_then(|u| u.original_name(module)) {
                keys.push(format!("lora_unet_{}", original.replace('.', "_")));
            }
            keys
        }
        Part::TextEncoder(i) => {
            // Text encoder modules are named from `text_model.` in every format.
            let (module, flat) = if module.starts_with("text_model.") {
                (module.to_string(), flat)
            } else {
                (format!("text_model.{module}"), format!("text_model_{flat}"))
            };
            if i == 0 {
                vec![
                    format!("lora_te_{flat}"),
                    format!("lora_te1_{flat}"),
                    format!("text_encoder.{module}"),
                ]
            } else {
                vec![
                    format!("lora_te2_{flat}"),
                    format!("text_encoder_2.{module}"),
                ]
            }
        }
    }
}

/// What a set of LoRAs does to one part's weights: each changed weight's total delta.
pub struct Patches {
    pub deltas: HashMap<String, Tensor>,
    /// The module keys that matched, per LoRA.
    pub matched: Vec<std::collections::HashSet<String>>,
}

/// The deltas `loras` (each with its multiplier) make to the weights named `names` of `part`
/// (`shapes` gives each weight's shape); modules are matched by their names in LoRA files.
/// `original` gives a weight as the model has it (f32), which a DoRA module's change depends
/// on; it is asked for those only.
pub fn patches(
    loras: &[(&Lora, f64)],
    part: Part,
    weights: &[(String, Vec<usize>)],
    original: &dyn Fn(&str) -> Result<Tensor>,
) -> Result<Patches> {
    let mut deltas: HashMap<String, Tensor> = HashMap::new();
    let mut matched = vec![std::collections::HashSet::new(); loras.len()];
    let layout = matches!(part, Part::Unet).then(|| UnetLayout::of(weights));
    for (name, shape) in weights {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        for (i, (lora, multiplier)) in loras.iter().enumerate() {
            let Some(key) = module_keys(part, module, layout.as_ref())
                .into_iter()
                .find(|k| lora.modules.contains_key(k))
            else {
                continue;
            };
            let delta = lora.change(&key, shape, *multiplier, &|| original(name))?;
            matched[i].insert(key);
            let total = match deltas.remove(name) {
                Some(d) => (d + delta)?,
                None => delta,
            };
            deltas.insert(name.clone(), total);
        }
    }
    Ok(Patches { deltas, matched })
}

#[cfg(test)]
mod original_names {
    use super::*;

    #[test]
    fn diffusers_unet_modules_in_the_original_naming() {
        // SDXL's layout: two resnets per block, up blocks 0 and 1 with attentions.
        let names: Vec<(String, Vec<usize>)> = [
            "down_blocks.0.resnets.1.conv1.weight",
            "up_blocks.0.attentions.0.proj_in.weight",
            "up_blocks.1.attentions.0.proj_in.weight",
        ]
        .iter()
        .map(|n| (n.to_string(), vec![1]))
        .collect();
        let layout = UnetLayout::of(&names);
        let o = |m: &str| layout.original_name(m).unwrap();
        assert_eq!(
            o("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!(
            o("down_blocks.2.resnets.1.conv2"),
            "input_blocks.8.0.out_layers.3"
        );
        assert_eq!(
            o("down_blocks.0.downsamplers.0.conv"),
            "input_blocks.3.0.op"
        );
        assert_eq!(
            o("mid_block.resnets.1.time_emb_proj"),
            "middle_block.2.emb_layers.1"
        );
        assert_eq!(
            o("mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj"),
            "middle_block.1.transformer_blocks.1.ff.net.0.proj"
        );
        assert_eq!(
            o("up_blocks.1.attentions.2.proj_out"),
            "output_blocks.5.1.proj_out"
        );
        assert_eq!(o("up_blocks.1.upsamplers.0.conv"), "output_blocks.5.2.conv");
        assert_eq!(
            o("up_blocks.2.resnets.0.conv_shortcut"),
            "output_blocks.6.0.skip_connection"
        );
        assert_eq!(o("time_embedding.linear_2"), "time_embed.2");
        assert_eq!(o("add_embedding.linear_1"), "label_emb.0.0");
        assert_eq!(o("conv_in"), "input_blocks.0.0");
    }
}
