//! Writes the data set to disk: a folder of images with same-named `.txt` captions
//! (`00000.png` + `00000.txt`, ...), each file written atomically (a temporary file in the
//! same folder, then a rename), so an interrupted run never leaves a half-written file.

use std::path::Path;

use super::{ShapesStream, IMAGE_SIZE};
use crate::error::{Error, Result};
use crate::png_out::{encode_rgb_png, write_atomic};

/// Writes the first `count` samples of the stream seeded with `seed` into `out` (created if
/// missing). Names are zero-padded to five digits, or more when `count` needs them.
pub fn write_dataset(count: usize, seed: u64, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let digits = count.saturating_sub(1).to_string().len().max(5);
    let side = IMAGE_SIZE as usize;
    let mut stream = ShapesStream::new(seed);
    for index in 0..count {
        let sample = stream.next_sample();
        let stem = format!("{index:0digits$}");
        let png = encode_rgb_png(&sample.image, side, side, None)?;
        write_atomic(&out.join(format!("{stem}.png")), &png)?;
        write_atomic(&out.join(format!("{stem}.txt")), sample.caption.as_bytes())?;
    }
    Ok(())
}
