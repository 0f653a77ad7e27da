//! Training data: the built-in `shapes` stream or a folder of images with same-named `.txt`
//! captions (resized and center-cropped to the training size). Both are addressed by a
//! position, so a resumed run continues with exactly the batch it would have seen.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::shapes::prng::mix64;
use super::shapes::{Sample, IMAGE_SIZE};
use crate::error::{Error, Result};

pub enum DataSource {
    Shapes {
        seed: u64,
    },
    Folder(FolderDataset),
    /// Item k comes from `extra` with probability `fraction` (a hash of `seed` and k), else
    /// from `main`; both are read at position k, so each keeps its own order.
    Mix {
        main: Box<DataSource>,
        extra: Box<DataSource>,
        fraction: f64,
        seed: u64,
    },
}

/// A batch: images in [-1, 1] as (batch, 3, size, size) and their captions.
pub struct Batch {
    pub images: Tensor,
    pub captions: Vec<String>,
}

impl DataSource {
    /// `shapes` or a folder path.
    pub fn open(spec: &str, seed: u64, size: usize) -> Result<Self> {
        if spec == "shapes" {
            if size != IMAGE_SIZE as usize {
                return Err(Error::InvalidRequest(format!(
                    "the shapes data set is {IMAGE_SIZE}x{IMAGE_SIZE}; got --size {size}"
                )));
            }
            return Ok(DataSource::Shapes { seed });
        }
        Ok(DataSource::Folder(FolderDataset::open(
            Path::new(spec),
            size,
        )?))
    }

    /// `main` with a `fraction` of its items replaced by `extra`'s (a curriculum mixed into
    /// the stream). Both must have the same image size.
    pub fn mixed(main: DataSource, extra: DataSource, fraction: f64, seed: u64) -> Result<Self> {
        if main.size() != extra.size() {
            return Err(Error::InvalidRequest(format!(
                "the mixed-in data has {0}x{0} images, the main data {1}x{1}",
                extra.size(),
                main.size()
            )));
        }
        Ok(DataSource::Mix {
            main: Box::new(main),
            extra: Box::new(extra),
            fraction,
            seed,
        })
    }

    fn size(&self) -> usize {
        match self {
            DataSource::Shapes { .. } => IMAGE_SIZE as usize,
            DataSource::Folder(f) => f.size,
            DataSource::Mix { main, .. } => main.size(),
        }
    }

    /// Item `k` of the stream: 8-bit RGB pixels (HWC) and its caption.
    fn item(&self, k: u64) -> Result<(Vec<u8>, String)> {
        match self {
            DataSource::Shapes { seed } => {
                let s = Sample::at(*seed, k);
                Ok((s.image, s.caption))
            }
            DataSource::Folder(f) => f.item(k as usize),
            DataSource::Mix {
                main,
                extra,
                fraction,
                seed,
            } => {
                // The top 53 bits of a hash of (seed, k) as a uniform number in [0, 1).
                let u = (mix64(seed ^ mix64(k)) >> 11) as f64 / (1u64 << 53) as f64;
                if u < *fraction {
                    extra.item(k)
                } else {
                    main.item(k)
                }
            }
        }
    }

    /// The batch of `n` items starting at item `position` of the stream.
    pub fn batch(&self, position: u64, n: usize, device: &Device) -> Result<Batch> {
        let mut pixels = Vec::new();
        let mut captions = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let (rgb, caption) = self.item(position + i)?;
            pixels.push(rgb);
            captions.push(caption);
        }
        Ok(Batch {
            images: images_to_tensor(&pixels, self.size(), device)?,
            captions,
        })
    }
}

/// 8-bit RGB images (HWC) to a (batch, 3, h, w) tensor in [-1, 1].
pub fn images_to_tensor(images: &[Vec<u8>], size: usize, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(images.len() * 3 * size * size);
    for rgb in images {
        for c in 0..3 {
            for p in 0..size * size {
                data.push(rgb[p * 3 + c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, size, size),
        device,
    )?)
}

/// A folder of `NAME.png|jpg|jpeg|webp` images with `NAME.txt` captions.
pub struct FolderDataset {
    items: Vec<(PathBuf, String)>,
    size: usize,
}

impl FolderDataset {
    pub fn open(dir: &Path, size: usize) -> Result<Self> {
        let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut items = Vec::new();
        for entry in read {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if !matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg" | "webp")) {
                continue;
            }
            let caption_path = path.with_extension("txt");
            let caption =
                std::fs::read_to_string(&caption_path).map_err(|e| Error::io(&caption_path, e))?;
            items.push((path, caption.trim().to_string()));
        }
        if items.is_empty() {
            return Err(Error::config(
                dir,
                "no images (png, jpg, webp) with .txt captions found",
            ));
        }
        items.sort();
        Ok(Self { items, size })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Item `index` modulo the folder size, resized (shorter side) and center-cropped.
    fn item(&self, index: usize) -> Result<(Vec<u8>, String)> {
        let (path, caption) = &self.items[index % self.items.len()];
        let img = image::open(path)
            .map_err(|e| Error::config(path, format!("cannot decode image: {e}")))?
            .to_rgb8();
        let (w, h) = img.dimensions();
        let scale = self.size as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(self.size as u32),
            ((h as f64 * scale).round() as u32).max(self.size as u32),
        );
        let resized = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Lanczos3);
        let (x0, y0) = ((nw - self.size as u32) / 2, (nh - self.size as u32) / 2);
        let cropped =
            image::imageops::crop_imm(&resized, x0, y0, self.size as u32, self.size as u32)
                .to_image();
        Ok((cropped.into_raw(), caption.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(seed: u64) -> DataSource {
        DataSource::Shapes { seed }
    }

    /// Which source each of the first `n` items came from (true: the mixed-in one).
    fn origins(mix: &DataSource, n: u64) -> Vec<bool> {
        (0..n)
            .map(|k| {
                let (image, caption) = mix.item(k).unwrap();
                let main = Sample::at(1, k);
                let extra = Sample::at(2, k);
                let from_extra = image == extra.image && caption == extra.caption;
                assert!(
                    from_extra || (image == main.image && caption == main.caption),
                    "item {k} is from neither source"
                );
                from_extra
            })
            .collect()
    }

    #[test]
    fn a_mix_takes_its_share_of_items_by_position() {
        let mix = DataSource::mixed(shapes(1), shapes(2), 0.25, 7).unwrap();
        let first = origins(&mix, 400);
        let extra = first.iter().filter(|&&e| e).count();
        // 100 expected; a binomial(400, 0.25) stays within 70..130 but for 1e-5 of seeds.
        assert!((70..130).contains(&extra), "{extra} of 400 from the mix");
        // The same positions give the same items (a resumed run sees the same stream).
        let again = DataSource::mixed(shapes(1), shapes(2), 0.25, 7).unwrap();
        assert_eq!(origins(&again, 400), first);
        // The whole share: every item from the mixed-in source.
        let all = DataSource::mixed(shapes(1), shapes(2), 1.0, 7).unwrap();
        assert!(origins(&all, 50).into_iter().all(|e| e));
    }
}
