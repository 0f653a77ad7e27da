//! The original (LDM/SGM) tensor names, mapped onto the diffusers names the model code loads:
//! one function per component, each returning `(diffusers name, stored piece)` pairs for the
//! stored names it recognises. A stored name of the component's prefix that no rule knows is
//! left out, and the checkpoint's final check reports it as unused.
//!
//! The rules follow the layout of the original code (`openaimodel.py`'s `input_blocks` /
//! `middle_block` / `output_blocks`, the autoencoder's `down`/`mid`/`up`, OpenCLIP's
//! `resblocks` with fused attention projections), with block positions worked out from the
//! config rather than assumed, so any layer count maps.

use crate::latent::unet::config::UNetConfig;
use crate::text::clip::ClipTextConfig;
use crate::weights::store::Piece;

pub type Layout = Vec<(String, Piece)>;

/// Names under `prefix`, with the prefix taken off.
fn under<'a>(names: &'a [String], prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
    names
        .iter()
        .filter_map(move |n| n.strip_prefix(prefix).map(|rest| (n.as_str(), rest)))
}

/// A ResNet block's inner names in the U-Net (`in_layers.0` is `norm1`, ...).
fn unet_resnet(rest: &str) -> Option<String> {
    let (head, leaf) = split2(rest)?;
    let new = match head {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "emb_layers.1" => "time_emb_proj",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{new}.{leaf}"))
}

/// `a.b.leaf` as (`a.b`, `leaf`): the module path and the parameter.
fn split2(rest: &str) -> Option<(&str, &str)> {
    rest.rsplit_once('.')
}

/// What one original U-Net module index is in diffusers' blocks.
#[derive(Clone, Copy)]
enum Slot {
    Resnet(usize, usize),
    Attention(usize, usize),
    Downsampler(usize),
    Upsampler(usize),
}

/// The U-Net (`model.diffusion_model.` in SD 1.x/2.x and SDXL checkpoints).
pub fn unet(names: &[String], prefix: &str, c: &UNetConfig) -> Layout {
    // input_blocks.0 is conv_in; then each down block's layers, and its downsampler unless
    // it is the last.
    let mut inputs: Vec<Vec<Slot>> = vec![Vec::new()];
    let levels = c.down_blocks.len();
    for (b, block) in c.down_blocks.iter().enumerate() {
        for l in 0..block.layers {
            let mut modules = vec![Slot::Resnet(b, l)];
            if block.cross_attention {
                modules.push(Slot::Attention(b, l));
            }
            inputs.push(modules);
        }
        if b + 1 < levels {
            inputs.push(vec![Slot::Downsampler(b)]);
        }
    }
    // output_blocks: each up block's layers; the last layer of every block but the last
    // also holds the upsampler, after its attention if it has one.
    let mut outputs: Vec<Vec<Slot>> = Vec::new();
    for (b, block) in c.up_blocks.iter().enumerate() {
        for l in 0..block.layers {
            let mut modules = vec![Slot::Resnet(b, l)];
            if block.cross_attention {
                modules.push(Slot::Attention(b, l));
            }
            if l + 1 == block.layers && b + 1 < c.up_blocks.len() {
                modules.push(Slot::Upsampler(b));
            }
            outputs.push(modules);
        }
    }
    let mut layout = Layout::new();
    for (stored, rest) in under(names, prefix) {
        if let Some(name) = unet_name(rest, &inputs, &outputs) {
            layout.push((name, Piece::Whole(stored.to_string())));
        }
    }
    layout
}

fn unet_name(rest: &str, inputs: &[Vec<Slot>], outputs: &[Vec<Slot>]) -> Option<String> {
    let mut parts = rest.splitn(3, '.');
    let (first, second, tail) = (parts.next()?, parts.next()?, parts.next().unwrap_or(""));
    let slot_name = |blocks: &str, slot: Slot, tail: &str| -> Option<String> {
        match slot {
            Slot::Resnet(b, l) => Some(format!("{blocks}.{b}.resnets.{l}.{}", unet_resnet(tail)?)),
            Slot::Attention(b, l) => Some(format!("{blocks}.{b}.attentions.{l}.{tail}")),
            Slot::Downsampler(b) => {
                let leaf = tail.strip_prefix("op.")?;
                Some(format!("{blocks}.{b}.downsamplers.0.conv.{leaf}"))
            }
            Slot::Upsampler(b) => {
                let leaf = tail.strip_prefix("conv.")?;
                Some(format!("{blocks}.{b}.upsamplers.0.conv.{leaf}"))
            }
        }
    };
    match first {
        "time_embed" => {
            let layer = match second {
                "0" => "linear_1",
                "2" => "linear_2",
                _ => return None,
            };
            Some(format!("time_embedding.{layer}.{tail}"))
        }
        // SDXL's added (pooled text and size) embedding: label_emb.0.{0,2}.
        "label_emb" => {
            let (layer, leaf) = tail.split_once('.')?;
            let layer = match (second, layer) {
                ("0", "0") => "linear_1",
                ("0", "2") => "linear_2",
                _ => return None,
            };
            Some(format!("add_embedding.{layer}.{leaf}"))
        }
        "input_blocks" => {
            let i: usize = second.parse().ok()?;
            let (module, tail) = tail.split_once('.')?;
            let module: usize = module.parse().ok()?;
            if i == 0 {
                return (module == 0).then(|| format!("conv_in.{tail}"));
            }
            slot_name("down_blocks", *inputs.get(i)?.get(module)?, tail)
        }
        "middle_block" => {
            let (module, rest) = (second, tail);
            match module {
                "0" => Some(format!("mid_block.resnets.0.{}", unet_resnet(rest)?)),
                "1" => Some(format!("mid_block.attentions.0.{rest}")),
                "2" => Some(format!("mid_block.resnets.1.{}", unet_resnet(rest)?)),
                _ => None,
            }
        }
        "output_blocks" => {
            let i: usize = second.parse().ok()?;
            let (module, tail) = tail.split_once('.')?;
            let module: usize = module.parse().ok()?;
            slot_name("up_blocks", *outputs.get(i)?.get(module)?, tail)
        }
        "out" => {
            let layer = match second {
                "0" => "conv_norm_out",
                "2" => "conv_out",
                _ => return None,
            };
            Some(format!("{layer}.{tail}"))
        }
        _ => None,
    }
}

/// A ControlNet in the original layout (`control_model.` in the released files, or no
/// prefix): its U-Net half named as the U-Net's encoder, `input_hint_block` (the control
/// image's convolutions, SiLU between them: the first, pairs, the last), `zero_convs` and
/// `middle_block_out`.
pub fn controlnet(names: &[String], prefix: &str, c: &UNetConfig) -> Layout {
    let mut layout: Layout = unet(names, prefix, c)
        .into_iter()
        .filter(|(name, _)| {
            !["up_blocks.", "conv_out.", "conv_norm_out."]
                .iter()
                .any(|p| name.starts_with(p))
        })
        .collect();
    let hints: Vec<usize> = under(names, prefix)
        .filter_map(|(_, rest)| {
            rest.strip_prefix("input_hint_block.")?
                .split('.')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let last = hints.iter().copied().max().unwrap_or(0);
    for (stored, rest) in under(names, prefix) {
        let name = if let Some(hint) = rest.strip_prefix("input_hint_block.") {
            let Some((index, leaf)) = hint.split_once('.') else {
                continue;
            };
            let Ok(index) = index.parse::<usize>() else {
                continue;
            };
            match index {
                0 => format!("controlnet_cond_embedding.conv_in.{leaf}"),
                i if i == last => format!("controlnet_cond_embedding.conv_out.{leaf}"),
                i if i % 2 == 0 => format!("controlnet_cond_embedding.blocks.{}.{leaf}", i / 2 - 1),
                _ => continue,
            }
        } else if let Some(zero) = rest.strip_prefix("zero_convs.") {
            let Some((index, leaf)) = zero.split_once(".0.") else {
                continue;
            };
            format!("controlnet_down_blocks.{index}.{leaf}")
        } else if let Some(leaf) = rest.strip_prefix("middle_block_out.0.") {
            format!("controlnet_mid_block.{leaf}")
        } else {
            continue;
        };
        layout.push((name, Piece::Whole(stored.to_string())));
    }
    layout
}

/// The autoencoder (`first_stage_model.`): `levels` is the length of its
/// `block_out_channels`; the decoder's `up.0` is the last up block in diffusers' order.
pub fn vae(names: &[String], prefix: &str, levels: usize) -> Layout {
    let mut layout = Layout::new();
    for (stored, rest) in under(names, prefix) {
        let Some((name, matrix)) = vae_name(rest, levels) else {
            continue;
        };
        let stored = stored.to_string();
        let piece = if matrix {
            Piece::Matrix(stored)
        } else {
            Piece::Whole(stored)
        };
        layout.push((name, piece));
    }
    layout
}

/// The diffusers name, and whether the stored tensor is a 1x1 convolution kernel that
/// diffusers keeps as a matrix (the mid-block attention's projections).
fn vae_name(rest: &str, levels: usize) -> Option<(String, bool)> {
    let resnet = |tail: &str| -> Option<String> {
        let (head, leaf) = split2(tail)?;
        let new = match head {
            "norm1" | "conv1" | "norm2" | "conv2" => head,
            "nin_shortcut" => "conv_shortcut",
            _ => return None,
        };
        Some(format!("{new}.{leaf}"))
    };
    if let Some(rest) = rest.strip_prefix("quant_conv.") {
        return Some((format!("quant_conv.{rest}"), false));
    }
    if let Some(rest) = rest.strip_prefix("post_quant_conv.") {
        return Some((format!("post_quant_conv.{rest}"), false));
    }
    let (part, rest) = rest.split_once('.')?;
    if part != "encoder" && part != "decoder" {
        return None;
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let plain = |s: String| Some((format!("{part}.{s}"), false));
    match parts.as_slice() {
        ["conv_in" | "conv_out", leaf] => plain(format!("{}.{leaf}", parts[0])),
        ["norm_out", leaf] => plain(format!("conv_norm_out.{leaf}")),
        ["down", i, "block", j, tail @ ..] if part == "encoder" => plain(format!(
            "down_blocks.{i}.resnets.{j}.{}",
            resnet(&tail.join("."))?
        )),
        ["down", i, "downsample", "conv", leaf] if part == "encoder" => {
            plain(format!("down_blocks.{i}.downsamplers.0.conv.{leaf}"))
        }
        ["up", i, "block", j, tail @ ..] if part == "decoder" => {
            let b = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            plain(format!(
                "up_blocks.{b}.resnets.{j}.{}",
                resnet(&tail.join("."))?
            ))
        }
        ["up", i, "upsample", "conv", leaf] if part == "decoder" => {
            let b = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            plain(format!("up_blocks.{b}.upsamplers.0.conv.{leaf}"))
        }
        ["mid", "block_1", tail @ ..] => {
            plain(format!("mid_block.resnets.0.{}", resnet(&tail.join("."))?))
        }
        ["mid", "block_2", tail @ ..] => {
            plain(format!("mid_block.resnets.1.{}", resnet(&tail.join("."))?))
        }
        ["mid", "attn_1", module, leaf] => {
            let (new, matrix) = match *module {
                "norm" => ("group_norm", false),
                "q" => ("to_q", *leaf == "weight"),
                "k" => ("to_k", *leaf == "weight"),
                "v" => ("to_v", *leaf == "weight"),
                "proj_out" => ("to_out.0", *leaf == "weight"),
                _ => return None,
            };
            Some((
                format!("{part}.mid_block.attentions.0.{new}.{leaf}"),
                matrix,
            ))
        }
        _ => None,
    }
}

/// A text encoder stored in the Hugging Face CLIP layout (SD 1.x's
/// `cond_stage_model.transformer.`, SDXL's first encoder): the names as they are, less the
/// position-id buffer.
pub fn clip_hf(names: &[String], prefix: &str) -> Layout {
    under(names, prefix)
        .filter(|(_, rest)| !rest.ends_with("position_ids"))
        .map(|(stored, rest)| (rest.to_string(), Piece::Whole(stored.to_string())))
        .collect()
}

/// A text encoder in OpenCLIP's layout (SD 2.x's `cond_stage_model.model.`, SDXL's second
/// encoder): `resblocks` with fused q/k/v projections, split here into diffusers' three.
/// Layers past the config's count are left out (SD 2.x uses the penultimate layer, and its
/// config has one layer fewer than the file); `text_projection`, stored transposed, is taken
/// only for an encoder with a projection (SDXL's `CLIPTextModelWithProjection`).
pub fn open_clip(names: &[String], prefix: &str, c: &ClipTextConfig, projection: bool) -> Layout {
    let mut layout = Layout::new();
    let w = c.hidden_size;
    for (stored, rest) in under(names, prefix) {
        let s = stored.to_string();
        let layer = |i: &str, tail: String| format!("text_model.encoder.layers.{i}.{tail}");
        let parts: Vec<&str> = rest.split('.').collect();
        match parts.as_slice() {
            ["token_embedding", "weight"] => layout.push((
                "text_model.embeddings.token_embedding.weight".into(),
                Piece::Whole(s),
            )),
            ["positional_embedding"] => layout.push((
                "text_model.embeddings.position_embedding.weight".into(),
                Piece::Whole(s),
            )),
            ["ln_final", leaf] => layout.push((
                format!("text_model.final_layer_norm.{leaf}"),
                Piece::Whole(s),
            )),
            ["text_projection"] if projection => {
                layout.push(("text_projection.weight".into(), Piece::Transposed(s)))
            }
            ["transformer", "resblocks", i, tail @ ..] => {
                if i.parse::<usize>()
                    .map_or(true, |i| i >= c.num_hidden_layers)
                {
                    continue;
                }
                match tail {
                    ["ln_1", leaf] => {
                        layout.push((layer(i, format!("layer_norm1.{leaf}")), Piece::Whole(s)))
                    }
                    ["ln_2", leaf] => {
                        layout.push((layer(i, format!("layer_norm2.{leaf}")), Piece::Whole(s)))
                    }
                    ["mlp", "c_fc", leaf] => {
                        layout.push((layer(i, format!("mlp.fc1.{leaf}")), Piece::Whole(s)))
                    }
                    ["mlp", "c_proj", leaf] => {
                        layout.push((layer(i, format!("mlp.fc2.{leaf}")), Piece::Whole(s)))
                    }
                    ["attn", "out_proj", leaf] => layout.push((
                        layer(i, format!("self_attn.out_proj.{leaf}")),
                        Piece::Whole(s),
                    )),
                    ["attn", fused @ ("in_proj_weight" | "in_proj_bias")] => {
                        let leaf = if *fused == "in_proj_weight" {
                            "weight"
                        } else {
                            "bias"
                        };
                        for (k, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            layout.push((
                                layer(i, format!("self_attn.{proj}.{leaf}")),
                                Piece::Rows {
                                    stored: s.clone(),
                                    start: k * w,
                                    len: w,
                                },
                            ));
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    layout
}

/// Stored names under `prefix` that the component deliberately does not load: OpenCLIP's
/// `logit_scale` and `text_projection` (SD 2.x), and the layers past the config's count.
pub fn open_clip_unused(
    names: &[String],
    prefix: &str,
    c: &ClipTextConfig,
    projection: bool,
) -> Vec<String> {
    under(names, prefix)
        .filter(|(_, rest)| {
            *rest == "logit_scale"
                || (*rest == "text_projection" && !projection)
                || rest
                    .strip_prefix("transformer.resblocks.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i >= c.num_hidden_layers)
        })
        .map(|(stored, _)| stored.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::single_file::configs::ConfigFiles;
    use crate::weights::single_file::Architecture;

    fn built_in_unet(arch: Architecture) -> UNetConfig {
        let files = ConfigFiles::built_in(arch);
        let text = files.require("unet/config.json").unwrap();
        UNetConfig::from_json(&text, &files.path("unet/config.json")).unwrap()
    }

    /// The names of the released checkpoints (as the original code lays them out) against
    /// the diffusers names of the released folders.
    #[test]
    fn released_unet_names_map_onto_diffusers() {
        let cases = [
            (
                Architecture::Sd1,
                "input_blocks.0.0.weight",
                "conv_in.weight",
            ),
            (
                Architecture::Sd1,
                "input_blocks.1.0.in_layers.2.weight",
                "down_blocks.0.resnets.0.conv1.weight",
            ),
            (
                Architecture::Sd1,
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                Architecture::Sd1,
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                Architecture::Sd1,
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                Architecture::Sd1,
                "input_blocks.11.0.emb_layers.1.weight",
                "down_blocks.3.resnets.1.time_emb_proj.weight",
            ),
            (
                Architecture::Sd1,
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                Architecture::Sd1,
                "middle_block.2.out_layers.3.weight",
                "mid_block.resnets.1.conv2.weight",
            ),
            (
                Architecture::Sd1,
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                Architecture::Sd1,
                "output_blocks.3.1.norm.weight",
                "up_blocks.1.attentions.0.norm.weight",
            ),
            (
                Architecture::Sd1,
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                Architecture::Sd1,
                "output_blocks.11.1.proj_out.weight",
                "up_blocks.3.attentions.2.proj_out.weight",
            ),
            (Architecture::Sd1, "out.2.weight", "conv_out.weight"),
            (
                Architecture::Sd1,
                "time_embed.2.bias",
                "time_embedding.linear_2.bias",
            ),
            (
                Architecture::Sdxl,
                "label_emb.0.0.weight",
                "add_embedding.linear_1.weight",
            ),
            (
                Architecture::Sdxl,
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                Architecture::Sdxl,
                "input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight",
                "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q.weight",
            ),
            (
                Architecture::Sdxl,
                "output_blocks.2.2.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                Architecture::Sdxl,
                "output_blocks.8.0.out_layers.3.weight",
                "up_blocks.2.resnets.2.conv2.weight",
            ),
        ];
        for (arch, ldm, diffusers) in cases {
            let names = vec![format!("model.diffusion_model.{ldm}")];
            let layout = unet(&names, "model.diffusion_model.", &built_in_unet(arch));
            let mapped: Vec<&str> = layout.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(mapped, [diffusers], "{arch:?} {ldm}");
        }
        // Positions that the layout does not have map to nothing (and are then reported).
        for ldm in [
            "output_blocks.2.2.conv.weight",
            "input_blocks.12.0.op.weight",
            "middle_block.3.x.weight",
        ] {
            let names = vec![format!("model.diffusion_model.{ldm}")];
            assert!(
                unet(
                    &names,
                    "model.diffusion_model.",
                    &built_in_unet(Architecture::Sd1)
                )
                .is_empty(),
                "{ldm}"
            );
        }
    }

    #[test]
    fn released_vae_and_open_clip_names_map_onto_diffusers() {
        let vae_cases = [
            (
                "decoder.up.3.block.0.conv1.weight",
                "decoder.up_blocks.0.resnets.0.conv1.weight",
                false,
            ),
            (
                "decoder.up.0.block.2.nin_shortcut.weight",
                "decoder.up_blocks.3.resnets.2.conv_shortcut.weight",
                false,
            ),
            (
                "decoder.up.1.upsample.conv.bias",
                "decoder.up_blocks.2.upsamplers.0.conv.bias",
                false,
            ),
            (
                "encoder.down.2.downsample.conv.weight",
                "encoder.down_blocks.2.downsamplers.0.conv.weight",
                false,
            ),
            (
                "encoder.mid.attn_1.q.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
                true,
            ),
            (
                "decoder.mid.attn_1.proj_out.bias",
                "decoder.mid_block.attentions.0.to_out.0.bias",
                false,
            ),
            (
                "decoder.norm_out.weight",
                "decoder.conv_norm_out.weight",
                false,
            ),
            ("post_quant_conv.weight", "post_quant_conv.weight", false),
        ];
        for (ldm, diffusers, matrix) in vae_cases {
            let names = vec![format!("first_stage_model.{ldm}")];
            let layout = vae(&names, "first_stage_model.", 4);
            assert_eq!(layout.len(), 1, "{ldm}");
            assert_eq!(layout[0].0, diffusers);
            assert_eq!(matches!(layout[0].1, Piece::Matrix(_)), matrix, "{ldm}");
        }
        let files = ConfigFiles::built_in(Architecture::Sd2);
        let config = ClipTextConfig::from_json(
            &files.require("text_encoder/config.json").unwrap(),
            &files.path("text_encoder/config.json"),
        )
        .unwrap();
        let p = "cond_stage_model.model.";
        let names: Vec<String> = [
            "transformer.resblocks.0.attn.in_proj_weight",
            "transformer.resblocks.22.mlp.c_fc.bias",
            "transformer.resblocks.23.mlp.c_fc.bias",
            "text_projection",
            "logit_scale",
        ]
        .iter()
        .map(|n| format!("{p}{n}"))
        .collect();
        let layout = open_clip(&names, p, &config, false);
        let mapped: Vec<String> = layout.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            mapped,
            [
                "text_model.encoder.layers.0.self_attn.q_proj.weight",
                "text_model.encoder.layers.0.self_attn.k_proj.weight",
                "text_model.encoder.layers.0.self_attn.v_proj.weight",
                "text_model.encoder.layers.22.mlp.fc1.bias",
            ]
        );
        assert!(matches!(
            layout[1].1,
            Piece::Rows {
                start: 1024,
                len: 1024,
                ..
            }
        ));
        // SD 2.x's 24th layer, its projection and logit scale are known to be unused.
        assert_eq!(open_clip_unused(&names, p, &config, false).len(), 3);
    }
}
