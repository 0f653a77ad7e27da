//! PNG output with A1111-style `parameters` metadata, written atomically (a temp file in the
//! same folder, then a rename) so a crash never leaves a half-written image.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::pipeline::{GenerateRequest, GeneratedImage, Resolved};

/// The A1111 `parameters` text: prompt, `Negative prompt:`, then one settings line.
pub fn a1111_parameters(
    req: &GenerateRequest,
    resolved: &Resolved,
    seed: u64,
    model: &str,
) -> String {
    let mut text = req.prompt().to_string();
    if !req.negative_prompt().is_empty() {
        text.push_str("\nNegative prompt: ");
        text.push_str(req.negative_prompt());
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {model}",
        resolved.steps,
        resolved.scheduler.a1111_name(),
        resolved.guidance_scale,
        resolved.width,
        resolved.height,
    ));
    if req.clip_skip > 0 {
        // A1111 counts the last layer as 1.
        text.push_str(&format!(", Clip skip: {}", req.clip_skip + 1));
    }
    if resolved.guidance_rescale > 0.0 {
        text.push_str(&format!(", CFG rescale: {}", resolved.guidance_rescale));
    }
    if !resolved.guidance_interval.is_full() {
        // Quoted: A1111's parser reads an unquoted value only up to the next comma.
        text.push_str(&format!(
            ", CFG interval: \"{}\"",
            resolved.guidance_interval
        ));
    }
    if resolved.autoguidance > 1.0 {
        text.push_str(&format!(", Autoguidance: {}", resolved.autoguidance));
    }
    if req.eta > 0.0 {
        text.push_str(&format!(", Eta: {}", req.eta));
    }
    if let Some(start) = resolved.refiner_start {
        text.push_str(&format!(", Refiner switch at: {start}"));
    }
    // A1111's img2img and hires fix fields.
    if let Some(strength) = resolved.strength {
        text.push_str(&format!(", Denoising strength: {strength}"));
    }
    if let Some(h) = &resolved.hires {
        text.push_str(&format!(", Denoising strength: {}", h.strength));
        match (
            req.hires.as_ref().and_then(|r| r.width.or(r.height)),
            h.scale,
        ) {
            (Some(_), _) => text.push_str(&format!(", Hires resize: {}x{}", h.width, h.height)),
            (None, scale) => text.push_str(&format!(", Hires upscale: {scale}")),
        }
        if h.steps != resolved.steps {
            text.push_str(&format!(", Hires steps: {}", h.steps));
        }
        text.push_str(&format!(", Hires upscaler: {}", h.upscaler.a1111_name()));
    }
    text
}

/// Encodes an RGB image as PNG bytes with a `parameters` tEXt chunk.
pub fn encode_png(image: &GeneratedImage, parameters: &str) -> Result<Vec<u8>> {
    encode_rgb_png(&image.rgb, image.width, image.height, Some(parameters))
}

pub fn encode_rgb_png(
    rgb: &[u8],
    width: usize,
    height: usize,
    parameters: Option<&str>,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let to_err = |e: png::EncodingError| Error::InvalidRequest(format!("PNG encoding failed: {e}"));
    {
        let mut encoder = png::Encoder::new(&mut bytes, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(p) = parameters {
            // tEXt is Latin-1; prompts are often not, so use the UTF-8 iTXt chunk then.
            if p.chars().all(|c| (c as u32) < 256 && c != '\0') {
                encoder
                    .add_text_chunk("parameters".into(), p.into())
                    .map_err(to_err)?;
            } else {
                encoder
                    .add_itxt_chunk("parameters".into(), p.into())
                    .map_err(to_err)?;
            }
        }
        let mut writer = encoder.write_header().map_err(to_err)?;
        writer.write_image_data(rgb).map_err(to_err)?;
        writer.finish().map_err(to_err)?;
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::config(path, "not a file path"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// The file name for image `index` of `count`: `out.png`, or `out-1.png`, `out-2.png`, ...
pub fn numbered_path(path: &Path, index: usize, count: usize) -> std::path::PathBuf {
    if count <= 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map_or_else(|| "png".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-{}.{ext}", index + 1))
}

/// Lays rows of same-sized images out as one RGB canvas, `gap` white pixels apart:
/// (rgb, width, height).
pub fn grid(rows: &[Vec<GeneratedImage>], gap: usize) -> Result<(Vec<u8>, usize, usize)> {
    let first = rows
        .first()
        .and_then(|r| r.first())
        .ok_or_else(|| Error::InvalidRequest("a grid needs at least one image".into()))?;
    let (w, h) = (first.width, first.height);
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (gw, gh) = (cols * (w + gap) - gap, rows.len() * (h + gap) - gap);
    let mut canvas = vec![255u8; gw * gh * 3];
    for (r, images) in rows.iter().enumerate() {
        for (c, image) in images.iter().enumerate() {
            if (image.width, image.height) != (w, h) {
                return Err(Error::InvalidRequest(
                    "grid images must share one size".into(),
                ));
            }
            for y in 0..h {
                let dst = ((r * (h + gap) + y) * gw + c * (w + gap)) * 3;
                canvas[dst..dst + w * 3].copy_from_slice(&image.rgb[y * w * 3..(y + 1) * w * 3]);
            }
        }
    }
    Ok((canvas, gw, gh))
}
