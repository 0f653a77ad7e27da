//! The training log: a progress bar with loss and images/s, and a CSV of the loss that a
//! resumed run continues (rows past the checkpoint are dropped so the curve has no repeats).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

pub struct TrainLog {
    csv: std::fs::File,
    path: PathBuf,
    bar: ProgressBar,
    started: Instant,
    images: usize,
    smoothed: Option<f64>,
}

impl TrainLog {
    /// Opens `out/loss.csv` keeping the rows of steps <= `resume_step`.
    pub fn open(
        out: &Path,
        header: &str,
        resume_step: usize,
        total: usize,
        quiet: bool,
    ) -> Result<Self> {
        let path = out.join("loss.csv");
        let mut kept = vec![header.to_string()];
        if resume_step > 0 {
            if let Ok(text) = std::fs::read_to_string(&path) {
                kept.extend(
                    text.lines()
                        .skip(1)
                        .filter(|l| {
                            l.split(',')
                                .next()
                                .and_then(|s| s.parse::<usize>().ok())
                                .is_some_and(|s| s <= resume_step)
                        })
                        .map(str::to_string),
                );
            }
        }
        let mut csv = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        writeln!(csv, "{}", kept.join("\n")).map_err(|e| Error::io(&path, e))?;
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total as u64)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid template"),
        );
        bar.set_position(resume_step as u64);
        Ok(Self {
            csv,
            path,
            bar,
            started: Instant::now(),
            images: 0,
            smoothed: None,
        })
    }

    /// Records one step: `values` are the CSV columns after the step number.
    pub fn step(&mut self, step: usize, loss: f64, batch: usize, extra: &[f64]) -> Result<()> {
        self.images += batch;
        let s = self.smoothed.map_or(loss, |s| 0.95 * s + 0.05 * loss);
        self.smoothed = Some(s);
        let rate = self.images as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let mut row = format!("{step},{loss}");
        for v in extra {
            row.push_str(&format!(",{v}"));
        }
        writeln!(self.csv, "{row}").map_err(|e| Error::io(&self.path, e))?;
        self.bar.set_position(step as u64);
        self.bar.set_message(format!("loss {s:.4} {rate:.1} img/s"));
        Ok(())
    }

    pub fn println(&self, msg: impl AsRef<str>) {
        self.bar.println(msg.as_ref());
    }

    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
