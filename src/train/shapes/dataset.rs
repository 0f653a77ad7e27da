//! Writes the data set to disk: a folder of images with same-named `.txt` captions
//! (`00000.png` + `00000.txt`, ...), each file written atomically (a temporary file in the
//! same folder, then a rename), so an interrupted run never leaves a half-written file.
//!
//! A [`Selection`] narrows the stream for curricula: only one-shape images in some cells,
//! and captions that state every attribute. Files keep their index in the stream, so a
//! selection of the first N samples is the same images as the whole N-sample set.

use std::path::Path;

use super::caption::{caption_for, PromptSpec};
use super::palette::Cell;
use super::{ShapesStream, IMAGE_SIZE};
use crate::error::{Error, Result};
use crate::png_out::{encode_rgb_png, write_atomic};

/// Which samples of the stream to write, and how to caption them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Keep only one-shape images whose shape lies in one of these cells (two-shape images
    /// are dropped); `None` keeps every sample.
    pub cells: Option<Vec<Cell>>,
    /// Keep only two-shape images (a curriculum for captions that name two shapes).
    pub two_shapes: bool,
    /// Caption each image with everything the grammar can state about it (size, position and
    /// background of one shape; the background of two) instead of the stream's caption,
    /// which leaves each optional part out half the time.
    pub full_captions: bool,
}

impl Selection {
    /// Parses a comma-separated list of cell names (`top left,bottom right`) or `all`.
    pub fn parse_cells(list: &str) -> Result<Vec<Cell>> {
        if list.trim() == "all" {
            return Ok(Cell::ALL.to_vec());
        }
        list.split(',')
            .map(|name| {
                let name = name.trim();
                Cell::ALL
                    .into_iter()
                    .find(|c| c.name() == name)
                    .ok_or_else(|| {
                        let known: Vec<String> = Cell::ALL
                            .iter()
                            .map(|c| format!("`{}`", c.name()))
                            .collect();
                        Error::InvalidRequest(format!(
                            "unknown cell `{name}`; cells are {} (comma-separated), or `all`",
                            known.join(", ")
                        ))
                    })
            })
            .collect()
    }
}

/// Writes the first `count` samples of the stream seeded with `seed` into `out` (created if
/// missing). Names are zero-padded to five digits, or more when `count` needs them.
pub fn write_dataset(count: usize, seed: u64, out: &Path) -> Result<()> {
    write_selection(count, seed, &Selection::default(), out).map(|_| ())
}

/// Writes the samples among the first `count` of the stream that `selection` keeps, named by
/// their index in the stream; returns how many it wrote.
pub fn write_selection(
    count: usize,
    seed: u64,
    selection: &Selection,
    out: &Path,
) -> Result<usize> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let digits = count.saturating_sub(1).to_string().len().max(5);
    let side = IMAGE_SIZE as usize;
    let mut stream = ShapesStream::new(seed);
    let mut written = 0;
    for index in 0..count {
        let sample = stream.next_sample();
        if selection.two_shapes && sample.scene.relation.is_none() {
            continue;
        }
        if let Some(cells) = &selection.cells {
            let one_in_cells =
                sample.scene.relation.is_none() && cells.contains(&sample.scene.shapes[0].cell);
            if !one_in_cells {
                continue;
            }
        }
        let caption = if selection.full_captions {
            caption_for(&PromptSpec::full(&sample.scene))
        } else {
            sample.caption
        };
        let stem = format!("{index:0digits$}");
        let png = encode_rgb_png(&sample.image, side, side, None)?;
        write_atomic(&out.join(format!("{stem}.png")), &png)?;
        write_atomic(&out.join(format!("{stem}.txt")), caption.as_bytes())?;
        written += 1;
    }
    Ok(written)
}
