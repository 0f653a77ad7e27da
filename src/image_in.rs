//! Pictures coming in (img2img's start, inpainting's mask): decoded from PNG, JPEG or WebP
//! with the size checked before any pixel is decoded, EXIF orientation applied, and alpha
//! dropped the way PIL's `convert("RGB")` drops it (the colour stays, the transparency goes).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// The largest side an input picture may have when the caller sets no other limit.
pub const DEFAULT_MAX_SIDE: usize = 8192;

/// Decodes a picture. `what` names it in errors (a file, a request field); a picture with a
/// side over `max_side` is refused from its header, before its pixels are decoded, so a
/// decompression bomb costs nothing.
pub fn decode(bytes: &[u8], what: &str, max_side: usize) -> Result<DynamicImage> {
    let bad = |why: String| Error::InvalidRequest(format!("{what}: {why}"));
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if reader.format().is_none() {
        return Err(bad("not a PNG, JPEG or WebP image".into()));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| bad(format!("not a readable image: {e}")))?;
    let (w, h) = decoder.dimensions();
    if w as usize > max_side || h as usize > max_side {
        return Err(bad(format!(
            "{w}x{h} is larger than the limit of {max_side} pixels a side"
        )));
    }
    if w == 0 || h == 0 {
        return Err(bad(format!("the image is empty ({w}x{h})")));
    }
    let mut limits = Limits::default();
    // Room for the decoded pixels (at most 16-bit RGBA) and the decoder's own buffers.
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * 8 + (64 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| bad(format!("cannot decode it within its size: {e}")))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| bad(format!("unreadable orientation: {e}")))?;
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| bad(format!("cannot decode it: {e}")))?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Reads and decodes a picture file.
pub fn open(path: &Path, max_side: usize) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    decode(&bytes, &path.display().to_string(), max_side)
}

/// The colour of a picture, 8 bits a channel, alpha dropped.
pub fn rgb(image: &DynamicImage) -> RgbImage {
    image.to_rgb8()
}

/// A mask's grey levels, as PIL's `convert("L")` makes them from colour
/// (L = (19595 R + 38470 G + 7471 B + 2^15) >> 16); alpha is ignored.
pub fn luma(image: &DynamicImage) -> GrayImage {
    let rgb = image.to_rgb8();
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        let l = (19595 * u32::from(r) + 38470 * u32::from(g) + 7471 * u32::from(b) + 0x8000) >> 16;
        image::Luma([l as u8])
    })
}

/// The mask of an OpenAI-style edit: the picture's transparent pixels are the area to
/// repaint (white), the opaque ones are kept (black).
pub fn transparency_mask(image: &DynamicImage) -> GrayImage {
    let rgba = image.to_rgba8();
    GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([255 - rgba.get_pixel(x, y).0[3]])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_picture_over_the_limit_is_refused_from_its_header() {
        let big = DynamicImage::new_rgb8(300, 20);
        let err = decode(&png(&big), "init_images[0]", 256).unwrap_err();
        assert!(
            err.to_string().contains("300x20 is larger than the limit"),
            "{err}"
        );
        assert!(decode(&png(&big), "x", 300).is_ok());
    }

    #[test]
    fn not_an_image_and_a_truncated_image_are_errors_naming_the_input() {
        let err = decode(b"hello, world", "--init-image a.txt", 1024).unwrap_err();
        assert!(
            err.to_string().contains("--init-image a.txt: not a PNG"),
            "{err}"
        );
        let mut bytes = png(&DynamicImage::new_rgb8(64, 64));
        bytes.truncate(bytes.len() / 2);
        assert!(decode(&bytes, "mask", 1024).is_err());
    }

    #[test]
    fn alpha_is_dropped_and_transparency_becomes_the_area_to_edit() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([10, 20, 30, 0]));
        rgba.put_pixel(1, 0, image::Rgba([200, 100, 50, 255]));
        let image = DynamicImage::ImageRgba8(rgba);
        assert_eq!(rgb(&image).as_raw(), &[10, 20, 30, 200, 100, 50]);
        assert_eq!(transparency_mask(&image).as_raw(), &[255, 0]);
        // PIL: Image.new("RGB", (1, 1), (200, 100, 50)).convert("L") is 124.
        assert_eq!(luma(&image).as_raw()[1], 124);
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 2x1 JPEG whose EXIF says "rotate 90 degrees clockwise" (orientation 6).
        let jpeg = {
            let mut out = Vec::new();
            let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
            let exif: Vec<u8> = [
                b"MM\0\x2a\0\0\0\x08".as_slice(),
                &[0, 1],                         // one entry
                &[0x01, 0x12, 0, 3, 0, 0, 0, 1], // Orientation, SHORT, count 1
                &[0, 6, 0, 0],                   // value 6
                &[0, 0, 0, 0],
            ]
            .concat();
            use image::ImageEncoder;
            encoder.set_exif_metadata(exif).unwrap();
            encoder
                .write_image(
                    &[255, 0, 0, 0, 0, 255],
                    2,
                    1,
                    image::ExtendedColorType::Rgb8,
                )
                .unwrap();
            out
        };
        let image = decode(&jpeg, "photo.jpg", 64).unwrap();
        assert_eq!((image.width(), image.height()), (1, 2));
    }
}
