//! What happens to the pictures around the denoise, as AUTOMATIC1111 does it: the init
//! picture fitted to the output size (`resize_mode`), the mask blurred, the masked area
//! pre-filled, "only masked" inpainting (work on the mask's box at full size, paste it back),
//! outpainting's larger canvas, and the original pasted back over the kept area.
//!
//! With none of these options a request reaches the pipeline unchanged (diffusers' images).

use image::imageops::{self, FilterType};
use image::{GrayImage, Luma, Rgb, RgbImage};

use super::GenerateRequest;
use crate::error::{Error, Result};

/// How an init picture of another size becomes the output size (A1111's `resize_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResizeMode {
    /// Stretched to the size (0, "Just resize"; diffusers' only way).
    #[default]
    Stretch,
    /// Scaled to cover the size, the overflow cut off evenly (1, "Crop and resize").
    Crop,
    /// Scaled to fit inside, the empty bands filled with the picture's stretched edges
    /// (2, "Resize and fill").
    Fill,
}

/// What fills the masked area before inpainting (A1111's `inpainting_fill`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MaskedContent {
    /// The colours around the mask, blurred into it (0, "fill").
    Fill,
    /// The picture as it is (1, "original"; diffusers').
    #[default]
    Original,
    /// Random latents under the mask (2, "latent noise").
    LatentNoise,
    /// Zero latents under the mask (3, "latent nothing").
    LatentNothing,
}

/// Inpainting's A1111 options; the default is diffusers' plain inpainting.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InpaintOptions {
    /// Gaussian blur of the mask, in pixels (A1111's `mask_blur`; its server default is 4).
    pub mask_blur: f32,
    /// Work on the mask's bounding box plus this many pixels, enlarged to the output's
    /// aspect ratio and scaled to the output size, then pasted back into the whole picture
    /// (A1111's "only masked", `inpaint_full_res`).
    pub only_masked_padding: Option<u32>,
    pub masked_content: MaskedContent,
    /// Paste the original picture back over the kept area (softly, along the blurred mask's
    /// edge), so that what was not masked comes out unchanged. A1111 always does.
    pub keep_original: bool,
}

/// Outpainting: the canvas grows by these many pixels on each side; the new area is filled
/// with the edge colours and noise, then inpainted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outpaint {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

/// How the generated images go back into the original picture.
#[derive(Clone, Debug)]
pub struct PasteBack {
    original: RgbImage,
    /// 255: the generated pixel, 0: the original's.
    alpha: GrayImage,
    /// "Only masked": where the generated image goes, (x, y, width, height) in the original.
    region: Option<(u32, u32, u32, u32)>,
}

/// The request the pipeline runs (pictures fitted, mask blurred, area cropped) and how its
/// images are pasted back. A request without a picture, or whose options are all off, is
/// returned as it is.
pub fn prepare(
    req: &GenerateRequest,
    factor: usize,
) -> Result<(GenerateRequest, Option<PasteBack>)> {
    let mut req = req.clone();
    if let Some(o) = req.outpaint.take() {
        outpaint(&mut req, o)?;
    }
    let Some(picture) = req.init_image.take() else {
        return Ok((req, None));
    };
    let options = req.inpaint.clone();
    if !(options.mask_blur.is_finite() && (0.0..=256.0).contains(&options.mask_blur)) {
        return Err(Error::InvalidRequest(format!(
            "mask blur must be 0 to 256 pixels, not {}",
            options.mask_blur
        )));
    }
    let Some(mask) = req.mask.take() else {
        req.init_image = Some(fit(&picture, &req, factor));
        return Ok((req, None));
    };
    let mask = imageops::resize(
        &mask,
        picture.width(),
        picture.height(),
        FilterType::Lanczos3,
    );
    let mask = if options.mask_blur > 0.0 {
        imageops::blur(&mask, options.mask_blur)
    } else {
        mask
    };
    // A1111's overlay: the blurred mask doubled, so the repainted area reaches full strength
    // inside the blur's edge.
    let alpha = GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        Luma([mask.get_pixel(x, y).0[0].saturating_mul(2)])
    });
    // What the result is pasted over: the whole picture (only masked), or the picture at the
    // output size, fitted once for both the run and the paste.
    let (work_picture, work_mask, region, original) = match options.only_masked_padding {
        Some(padding) => {
            let (w, h) = work_size(&req, &picture, factor);
            let region = crop_region(&mask, padding, w, h).ok_or_else(|| {
                Error::InvalidRequest(
                    "the mask is empty: nothing to repaint (white marks the area to repaint)"
                        .into(),
                )
            })?;
            let (x, y, rw, rh) = region;
            let crop = |img: &RgbImage| imageops::crop_imm(img, x, y, rw, rh).to_image();
            let picture_crop =
                imageops::resize(&crop(&picture), w as u32, h as u32, FilterType::Lanczos3);
            let mask_crop = imageops::crop_imm(&mask, x, y, rw, rh).to_image();
            let mask_crop = imageops::resize(&mask_crop, w as u32, h as u32, FilterType::Lanczos3);
            req.width = Some(w);
            req.height = Some(h);
            (picture_crop, mask_crop, Some(region), picture)
        }
        None => {
            let fitted = fit(&picture, &req, factor);
            let (w, h) = (fitted.width(), fitted.height());
            let mask = imageops::resize(&mask, w, h, FilterType::Lanczos3);
            (fitted.clone(), mask, None, fitted)
        }
    };
    let work_picture = if options.masked_content == MaskedContent::Fill {
        fill_masked(&work_picture, &work_mask)
    } else {
        work_picture
    };
    req.init_image = Some(work_picture);
    req.mask = Some(work_mask);
    let paste = (options.keep_original || region.is_some()).then(|| {
        // The overlay's alpha at the size of what it is pasted over.
        let alpha = imageops::resize(
            &alpha,
            original.width(),
            original.height(),
            FilterType::Lanczos3,
        );
        PasteBack {
            original,
            alpha: if options.keep_original {
                alpha
            } else {
                // Only masked without the overlay: the whole region is the generated one.
                GrayImage::from_pixel(alpha.width(), alpha.height(), Luma([255]))
            },
            region,
        }
    });
    Ok((req, paste))
}

/// The working size: the request's, else the picture's rounded down to the VAE's factor.
fn work_size(req: &GenerateRequest, picture: &RgbImage, factor: usize) -> (usize, usize) {
    let round = |v: u32| (v as usize / factor * factor).max(factor);
    (
        req.width.unwrap_or(round(picture.width())),
        req.height.unwrap_or(round(picture.height())),
    )
}

/// The picture at the output size, by the request's resize mode.
fn fit(picture: &RgbImage, req: &GenerateRequest, factor: usize) -> RgbImage {
    let (w, h) = work_size(req, picture, factor);
    fit_to(picture, req.resize_mode, w as u32, h as u32)
}

/// `picture` at `w` x `h`: stretched, cropped to the aspect ratio, or fitted inside and the
/// rest filled with its edges (A1111's three resize modes; Lanczos).
pub fn fit_to(picture: &RgbImage, mode: ResizeMode, w: u32, h: u32) -> RgbImage {
    if (picture.width(), picture.height()) == (w, h) {
        return picture.clone();
    }
    let (pw, ph) = (picture.width() as f64, picture.height() as f64);
    match mode {
        ResizeMode::Stretch => imageops::resize(picture, w, h, FilterType::Lanczos3),
        ResizeMode::Crop => {
            let scale = (w as f64 / pw).max(h as f64 / ph);
            let (sw, sh) = (
                ((pw * scale).round() as u32).max(w),
                ((ph * scale).round() as u32).max(h),
            );
            let scaled = imageops::resize(picture, sw, sh, FilterType::Lanczos3);
            imageops::crop_imm(&scaled, (sw - w) / 2, (sh - h) / 2, w, h).to_image()
        }
        ResizeMode::Fill => {
            let scale = (w as f64 / pw).min(h as f64 / ph);
            let (sw, sh) = (
                ((pw * scale).round() as u32).clamp(1, w),
                ((ph * scale).round() as u32).clamp(1, h),
            );
            let scaled = imageops::resize(picture, sw, sh, FilterType::Lanczos3);
            let (ox, oy) = ((w - sw) / 2, (h - sh) / 2);
            // Each empty pixel takes the nearest edge pixel's colour (the edges stretched).
            RgbImage::from_fn(w, h, |x, y| {
                let sx = x.saturating_sub(ox).min(sw - 1);
                let sy = y.saturating_sub(oy).min(sh - 1);
                *scaled.get_pixel(sx, sy)
            })
        }
    }
}

/// A1111's crop for "only masked": the mask's bounding box plus `padding`, grown to the
/// work size's aspect ratio around its centre, inside the picture. `None`: an empty mask.
fn crop_region(mask: &GrayImage, padding: u32, w: usize, h: usize) -> Option<(u32, u32, u32, u32)> {
    let (mw, mh) = (mask.width() as i64, mask.height() as i64);
    let (mut x1, mut y1, mut x2, mut y2) = (mw, mh, -1i64, -1i64);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] > 0 {
            x1 = x1.min(x as i64);
            y1 = y1.min(y as i64);
            x2 = x2.max(x as i64 + 1);
            y2 = y2.max(y as i64 + 1);
        }
    }
    if x2 < 0 {
        return None;
    }
    let p = padding as i64;
    let (mut x1, mut y1, mut x2, mut y2) = (
        (x1 - p).max(0),
        (y1 - p).max(0),
        (x2 + p).min(mw),
        (y2 + p).min(mh),
    );
    // Grow the shorter side to the work size's aspect ratio, centred, then shift inside.
    let ratio = w as f64 / h as f64;
    let (cw, ch) = ((x2 - x1) as f64, (y2 - y1) as f64);
    if cw / ch < ratio {
        (x1, x2) = grow_centred(x1, x2, ((ch * ratio).round() as i64).min(mw), mw);
    } else {
        (y1, y2) = grow_centred(y1, y2, ((cw / ratio).round() as i64).min(mh), mh);
    }
    let (x1, y1) = (x1.max(0), y1.max(0));
    Some((x1 as u32, y1 as u32, (x2 - x1) as u32, (y2 - y1) as u32))
}

/// The span `lo..hi` grown to `want` around its centre, shifted back inside `0..limit`.
fn grow_centred(lo: i64, hi: i64, want: i64, limit: i64) -> (i64, i64) {
    let grow = want - (hi - lo);
    let (mut lo, mut hi) = (lo - grow / 2, hi + grow - grow / 2);
    if lo < 0 {
        hi -= lo;
        lo = 0;
    }
    if hi > limit {
        lo -= hi - limit;
        hi = limit;
    }
    (lo, hi)
}

/// A1111's "fill": the kept pixels blurred outward at shrinking radii, each layer laid over
/// the last, so the masked area takes the colours around it.
fn fill_masked(picture: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (w, h) = (picture.width(), picture.height());
    // Premultiplied colour and coverage of the kept pixels.
    let mut layer: Vec<[f32; 4]> = picture
        .pixels()
        .zip(mask.pixels())
        .map(|(p, m)| {
            let a = 1.0 - f32::from(m.0[0]) / 255.0;
            [
                f32::from(p.0[0]) * a,
                f32::from(p.0[1]) * a,
                f32::from(p.0[2]) * a,
                a * 255.0,
            ]
        })
        .collect();
    let as_image = |v: &[[f32; 4]]| {
        image::Rgba32FImage::from_fn(w, h, |x, y| image::Rgba(v[(y * w + x) as usize]))
    };
    let mut out = vec![[0f32; 3]; (w * h) as usize];
    for (radius, repeats) in [
        (256.0, 1),
        (64.0, 1),
        (16.0, 2),
        (4.0, 4),
        (2.0, 2),
        (0.0, 1),
    ] {
        let blurred: Vec<[f32; 4]> = if radius > 0.0 {
            imageops::blur(&as_image(&layer), radius)
                .pixels()
                .map(|p| p.0)
                .collect()
        } else {
            layer.clone()
        };
        for _ in 0..repeats {
            for (o, b) in out.iter_mut().zip(&blurred) {
                let a = (b[3] / 255.0).clamp(0.0, 1.0);
                if a > 0.0 {
                    for c in 0..3 {
                        // Premultiplied over: colour = b + o (1 - a).
                        o[c] = b[c] + o[c] * (1.0 - a);
                    }
                }
            }
        }
    }
    layer.clear();
    RgbImage::from_fn(w, h, |x, y| {
        let o = out[(y * w + x) as usize];
        Rgb([
            o[0].round().clamp(0.0, 255.0) as u8,
            o[1].round().clamp(0.0, 255.0) as u8,
            o[2].round().clamp(0.0, 255.0) as u8,
        ])
    })
}

/// Outpainting: the picture on a larger canvas (the new area its nearest edge colour plus
/// noise), the mask white over the new area, blurred a little into the old.
fn outpaint(req: &mut GenerateRequest, o: Outpaint) -> Result<()> {
    let Some(picture) = req.init_image.take() else {
        return Err(Error::InvalidRequest(
            "outpainting needs an init image to extend".into(),
        ));
    };
    if req.mask.is_some() {
        return Err(Error::InvalidRequest(
            "outpainting makes its own mask (the new area); give no mask with it".into(),
        ));
    }
    if o == Outpaint::default() {
        return Err(Error::InvalidRequest(
            "outpainting needs at least one side to grow".into(),
        ));
    }
    let (pw, ph) = (picture.width(), picture.height());
    let (w, h) = (pw + o.left + o.right, ph + o.top + o.bottom);
    if w > 16384 || h > 16384 {
        return Err(Error::InvalidRequest(format!(
            "the outpainted canvas {w}x{h} is too large"
        )));
    }
    let mut noise = crate::rng::TorchGenerator::new(req.seed.unwrap_or(0));
    let canvas = RgbImage::from_fn(w, h, |x, y| {
        let sx = (x as i64 - o.left as i64).clamp(0, pw as i64 - 1) as u32;
        let sy = (y as i64 - o.top as i64).clamp(0, ph as i64 - 1) as u32;
        let inside = x >= o.left && x < o.left + pw && y >= o.top && y < o.top + ph;
        let p = *picture.get_pixel(sx, sy);
        if inside {
            p
        } else {
            let n = (noise.uniform() as f32 - 0.5) * 64.0;
            Rgb(p
                .0
                .map(|c| (f32::from(c) + n).round().clamp(0.0, 255.0) as u8))
        }
    });
    let mask = GrayImage::from_fn(w, h, |x, y| {
        let inside = x >= o.left && x < o.left + pw && y >= o.top && y < o.top + ph;
        Luma([if inside { 0 } else { 255 }])
    });
    req.init_image = Some(canvas);
    req.mask = Some(mask);
    Ok(())
}

impl PasteBack {
    /// An image of the run pasted back into the original picture.
    pub fn apply(&self, rgb: &[u8], width: usize, height: usize) -> (Vec<u8>, usize, usize) {
        let generated = RgbImage::from_raw(width as u32, height as u32, rgb.to_vec())
            .expect("an image of its own size");
        let (x0, y0, placed) = match self.region {
            Some((x, y, w, h)) => (
                x,
                y,
                imageops::resize(&generated, w, h, FilterType::Lanczos3),
            ),
            None => (0, 0, generated),
        };
        let mut out = self.original.clone();
        for (x, y, p) in placed.enumerate_pixels() {
            let (ox, oy) = (x + x0, y + y0);
            if ox >= out.width() || oy >= out.height() {
                continue;
            }
            let a = f32::from(self.alpha.get_pixel(ox, oy).0[0]) / 255.0;
            let o = out.get_pixel_mut(ox, oy);
            for c in 0..3 {
                o.0[c] = (f32::from(p.0[c]) * a + f32::from(o.0[c]) * (1.0 - a)).round() as u8;
            }
        }
        let (w, h) = (out.width() as usize, out.height() as usize);
        (out.into_raw(), w, h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picture(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x * 4) as u8, (y * 4) as u8, 100]))
    }

    #[test]
    fn the_crop_region_holds_the_mask_and_has_the_work_aspect() {
        let mut mask = GrayImage::new(64, 64);
        for y in 20..30 {
            for x in 10..20 {
                mask.put_pixel(x, y, Luma([255]));
            }
        }
        let (x, y, w, h) = crop_region(&mask, 4, 64, 32).unwrap();
        assert!(
            x <= 6 && y <= 16 && x + w >= 24 && y + h >= 34,
            "{x} {y} {w} {h}"
        );
        assert_eq!(w, 2 * h);
        assert!(x + w <= 64 && y + h <= 64);
        assert!(crop_region(&GrayImage::new(8, 8), 4, 8, 8).is_none());
    }

    #[test]
    fn keep_original_leaves_the_unmasked_pixels_as_they_were() {
        let original = picture(16, 16);
        let mut mask = GrayImage::new(16, 16);
        mask.put_pixel(8, 8, Luma([255]));
        let req = GenerateRequest {
            init_image: Some(original.clone()),
            mask: Some(mask),
            inpaint: InpaintOptions {
                keep_original: true,
                ..Default::default()
            },
            ..GenerateRequest::new("x")
        };
        let (run, paste) = prepare(&req, 8).unwrap();
        assert_eq!(run.init_image.as_ref().unwrap(), &original);
        let generated = vec![7u8; 16 * 16 * 3];
        let (out, w, h) = paste.unwrap().apply(&generated, 16, 16);
        assert_eq!((w, h), (16, 16));
        let out = RgbImage::from_raw(16, 16, out).unwrap();
        assert_eq!(out.get_pixel(0, 0), original.get_pixel(0, 0));
        assert_eq!(out.get_pixel(8, 8).0, [7, 7, 7]);
    }

    #[test]
    fn only_masked_works_on_the_box_and_returns_the_whole_picture() {
        let original = picture(64, 48);
        let mut mask = GrayImage::new(64, 48);
        for y in 10..20 {
            for x in 30..40 {
                mask.put_pixel(x, y, Luma([255]));
            }
        }
        let req = GenerateRequest {
            init_image: Some(original.clone()),
            mask: Some(mask),
            width: Some(32),
            height: Some(32),
            inpaint: InpaintOptions {
                only_masked_padding: Some(2),
                keep_original: true,
                ..Default::default()
            },
            ..GenerateRequest::new("x")
        };
        let (run, paste) = prepare(&req, 8).unwrap();
        let work = run.init_image.as_ref().unwrap();
        assert_eq!((work.width(), work.height()), (32, 32));
        let (out, w, h) = paste.unwrap().apply(&vec![0u8; 32 * 32 * 3], 32, 32);
        assert_eq!((w, h), (64, 48));
        let out = RgbImage::from_raw(64, 48, out).unwrap();
        assert_eq!(out.get_pixel(35, 15).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(2, 40), original.get_pixel(2, 40));
    }

    #[test]
    fn resize_modes_keep_the_aspect_where_asked() {
        // A 40x20 picture (left half black, right half white) to 32x32.
        let wide = RgbImage::from_fn(
            40,
            20,
            |x, _| if x < 20 { Rgb([0; 3]) } else { Rgb([255; 3]) },
        );
        let req = |mode| GenerateRequest {
            width: Some(32),
            height: Some(32),
            resize_mode: mode,
            ..GenerateRequest::new("x")
        };
        let cropped = fit(&wide, &req(ResizeMode::Crop), 8);
        assert_eq!((cropped.width(), cropped.height()), (32, 32));
        // Crop: scaled to 64x32, the middle 32 columns: half black, half white.
        assert!(cropped.get_pixel(4, 16).0[0] < 30 && cropped.get_pixel(28, 16).0[0] > 225);
        let filled = fit(&wide, &req(ResizeMode::Fill), 8);
        // Fill: scaled to 32x16 in the middle, top and bottom bands take the edge rows.
        assert_eq!(filled.get_pixel(2, 0), filled.get_pixel(2, 8));
        assert!(filled.get_pixel(2, 0).0[0] < 30);
    }

    #[test]
    fn fill_takes_the_colours_around_the_mask() {
        let red = RgbImage::from_pixel(32, 32, Rgb([200, 10, 10]));
        let mut mask = GrayImage::new(32, 32);
        for y in 8..24 {
            for x in 8..24 {
                mask.put_pixel(x, y, Luma([255]));
            }
        }
        let mut holed = red.clone();
        for y in 8..24 {
            for x in 8..24 {
                holed.put_pixel(x, y, Rgb([0, 0, 255]));
            }
        }
        let filled = fill_masked(&holed, &mask);
        let centre = filled.get_pixel(16, 16).0;
        assert!(centre[0] > 150 && centre[2] < 60, "{centre:?}");
    }

    #[test]
    fn outpainting_grows_the_canvas_and_masks_the_new_area() {
        let req = GenerateRequest {
            init_image: Some(picture(32, 32)),
            outpaint: Some(Outpaint {
                left: 16,
                right: 0,
                top: 0,
                bottom: 8,
            }),
            ..GenerateRequest::new("x")
        };
        let (run, _) = prepare(&req, 8).unwrap();
        let (canvas, mask) = (run.init_image.unwrap(), run.mask.unwrap());
        assert_eq!((canvas.width(), canvas.height()), (48, 40));
        assert_eq!(mask.get_pixel(0, 0).0[0], 255);
        assert_eq!(mask.get_pixel(20, 10).0[0], 0);
        assert_eq!(mask.get_pixel(20, 35).0[0], 255);
        assert_eq!(canvas.get_pixel(20, 10), picture(32, 32).get_pixel(4, 10));
    }
}
