//! `evaluate`: the shapes checker run over a fixed prompt set, to measure what a model
//! trained on `shapes` does: adherence to what each prompt states (pooled per group and per
//! attribute) and the diversity the seed brings where the prompt leaves things open.

use std::collections::{BTreeMap, BTreeSet};

use super::checker::{check, Attribute, Judgement, Verdict};
use super::shapes::caption::{caption_for, PromptSpec, ShapeSpec};
use super::shapes::prng::SplitMix64;
use super::shapes::{Cell, Color, Sample, HELD_OUT};
use crate::error::Result;
use crate::pipeline::{GenerateRequest, Pipeline};

/// The groups of the prompt set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Seen,
    HeldOut,
    TwoShapes,
    Open,
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::Seen => "seen",
            Group::HeldOut => "held-out",
            Group::TwoShapes => "two-shape",
            Group::Open => "open",
        }
    }

    pub const ALL: [Group; 4] = [Group::Seen, Group::HeldOut, Group::TwoShapes, Group::Open];
}

impl std::str::FromStr for Group {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Group::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Group::ALL.iter().map(|g| g.name()).collect();
                format!(
                    "unknown prompt group `{s}` (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// The fixed prompt set: every held-out combination with and without position and
/// background phrases, 40 seen one-shape captions and 10 two-shape captions drawn from the
/// grammar with a fixed seed, and 4 open prompts (color and shape only).
pub fn prompt_set() -> Vec<(Group, String)> {
    let mut prompts = Vec::new();
    let mut rng = SplitMix64::for_item(0xe7a1, 0);
    for (i, (color, kind)) in HELD_OUT.iter().enumerate() {
        let shape = ShapeSpec {
            color: *color,
            kind: *kind,
        };
        let cell = Cell::ALL[(2 * i + 1) % 9];
        let background = Color::ALL
            .iter()
            .copied()
            .filter(|c| c != color)
            .nth(i * 2 % 7)
            .expect("7 others");
        for (position, bg) in [
            (None, None),
            (Some(cell), None),
            (None, Some(background)),
            (Some(cell), Some(background)),
        ] {
            let spec = PromptSpec::One {
                size: None,
                shape,
                position,
                background: bg,
            };
            prompts.push((Group::HeldOut, caption_for(&spec)));
        }
    }
    let (mut seen, mut two) = (Vec::new(), Vec::new());
    let mut index = 0u64;
    while seen.len() < 40 || two.len() < 10 {
        let sample = Sample::at(0x5eeb_ca97, index + (rng.next_u64() % 3));
        index += 3;
        match sample.prompt {
            PromptSpec::One { .. } if seen.len() < 40 && !seen.contains(&sample.caption) => {
                seen.push(sample.caption)
            }
            PromptSpec::Two { .. } if two.len() < 10 && !two.contains(&sample.caption) => {
                two.push(sample.caption)
            }
            _ => {}
        }
    }
    prompts.extend(seen.into_iter().map(|c| (Group::Seen, c)));
    prompts.extend(two.into_iter().map(|c| (Group::TwoShapes, c)));
    for open in [
        "a red circle",
        "a blue square",
        "a yellow triangle",
        "a white circle",
    ] {
        prompts.push((Group::Open, open.to_string()));
    }
    prompts
}

/// Right / stated counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub right: usize,
    pub stated: usize,
}

impl Tally {
    pub fn percent(&self) -> f64 {
        if self.stated == 0 {
            f64::NAN
        } else {
            100.0 * self.right as f64 / self.stated as f64
        }
    }

    /// One stated attribute, judged `right` or not.
    fn count(&mut self, right: bool) {
        self.stated += 1;
        self.right += usize::from(right);
    }

    fn add(&mut self, j: &Judgement) {
        self.right += j.right();
        self.stated += j.stated();
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub per_group: BTreeMap<Group, Tally>,
    pub per_attribute: BTreeMap<(Group, Attribute), Tally>,
    /// Two-shape prompts: how many images had 0, 1, 2 and 3 or more shapes (components).
    /// The checker needs exactly two, so this separates shapes merged or lost from shapes
    /// drawn but with the wrong colors, kinds or order.
    pub two_shape_counts: [usize; 4],
    /// Open prompts: (prompt, distinct cells, distinct backgrounds) over the seeds.
    pub diversity: Vec<(String, usize, usize)>,
    /// The checker on the data set's own images (must be 100 %).
    pub ground_truth: Tally,
    /// The checker on the data set's images after the model's autoencoder (encoded to the
    /// latent mean, decoded): the ceiling for what the U-Net's latents can score. Pooled, then
    /// per attribute.
    pub autoencoded: Tally,
    pub autoencoded_per_attribute: BTreeMap<Attribute, Tally>,
    pub images: usize,
    /// The seeds each prompt was generated with: `seeds.0` and the ones after it.
    pub seeds: (u64, usize),
    /// Every verdict on every generated image, when `EvaluateOptions::keep_verdicts` asks
    /// for them (what `evaluate --details` writes): where the pooled figures come from.
    pub verdicts: Vec<ImageVerdict>,
}

/// One stated attribute of one generated image, judged.
#[derive(Clone, Debug)]
pub struct ImageVerdict {
    /// The prompt group's name, or `autoencoded` for the data set's own images after the
    /// autoencoder.
    pub group: &'static str,
    pub prompt: String,
    /// The image's generation seed; for `autoencoded` rows, the data set item's index.
    pub seed: u64,
    /// Shapes (components) the checker found in the image.
    pub shapes_found: usize,
    pub verdict: Verdict,
}

impl ImageVerdict {
    pub const CSV_HEADER: &'static str =
        "group,prompt,seed,shapes_found,attribute,shape,stated,seen,right";

    /// One CSV line (no newline); fields are quoted where they hold a comma or a quote.
    pub fn csv_line(&self) -> String {
        let v = &self.verdict;
        [
            self.group.to_string(),
            self.prompt.clone(),
            self.seed.to_string(),
            self.shapes_found.to_string(),
            v.attribute.name().to_string(),
            v.shape.map(|s| s.to_string()).unwrap_or_default(),
            v.stated.clone(),
            v.seen.clone().unwrap_or_default(),
            v.right.to_string(),
        ]
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",")
    }
}

fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_string()
    }
}

pub struct EvaluateOptions {
    pub seeds: usize,
    /// The first of the `seeds` consecutive seeds each prompt is generated with. The goals are
    /// measured from `EVALUATION_FIRST_SEED`; choosing settings on another range keeps those
    /// figures from being tuned to their own seeds.
    pub first_seed: u64,
    /// Evaluate only every k-th prompt of the set, after `groups` (1 = all), for quick runs.
    pub stride: usize,
    /// Evaluate only these groups of the set (empty: all), for quick runs on one weakness.
    pub groups: Vec<Group>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub guidance_rescale: Option<f64>,
    pub guidance_interval: Option<crate::pipeline::GuidanceInterval>,
    pub autoguidance: Option<f64>,
    pub ground_truth_images: usize,
    /// Keep every verdict in `Report::verdicts`.
    pub keep_verdicts: bool,
}

/// The first seed of the evaluation's images, as the goals are measured.
pub const EVALUATION_FIRST_SEED: u64 = 1000;

/// The data set's seed for the images the checker scores as they are and autoencoded.
const GROUND_TRUTH_SEED: u64 = 0xda7a;

/// Scores `count` of the data set's images after a round trip through the model's
/// autoencoder (the latent distribution's mean, decoded), pooled and per attribute; every
/// verdict goes to `verdicts` when it is given.
pub fn score_autoencoded(
    pipeline: &Pipeline,
    count: usize,
    mut verdicts: Option<&mut Vec<ImageVerdict>>,
) -> Result<(Tally, BTreeMap<Attribute, Tally>)> {
    const BATCH: usize = 25;
    let (mut tally, mut per_attribute) = (Tally::default(), BTreeMap::<Attribute, Tally>::new());
    let device = candle_core::Device::Cpu;
    for start in (0..count).step_by(BATCH) {
        let samples: Vec<Sample> = (start..count.min(start + BATCH))
            .map(|i| Sample::at(GROUND_TRUTH_SEED, i as u64))
            .collect();
        let pixels: Vec<Vec<u8>> = samples.iter().map(|s| s.image.clone()).collect();
        let x = super::data::images_to_tensor(&pixels, 64, &device)?;
        let kl = pipeline.vae.kl().ok_or_else(|| {
            crate::error::Error::InvalidRequest(
                "the autoencoder check needs a KL autoencoder".into(),
            )
        })?;
        let (mean, _) = kl.encode(&x)?;
        let decoded = pipeline.vae.decode(&mean)?;
        for (i, s) in samples.iter().enumerate() {
            let image = crate::pipeline::to_rgb8(&decoded.get(i)?, 0)?;
            let judgement = check(&s.caption, &image.rgb, image.width, image.height)?;
            tally.add(&judgement);
            for v in &judgement.verdicts {
                per_attribute.entry(v.attribute).or_default().count(v.right);
                if let Some(out) = verdicts.as_deref_mut() {
                    out.push(ImageVerdict {
                        group: "autoencoded",
                        prompt: s.caption.clone(),
                        seed: start as u64 + i as u64,
                        shapes_found: judgement.analysis.components.len(),
                        verdict: v.clone(),
                    });
                }
            }
        }
    }
    Ok((tally, per_attribute))
}

/// Scores the data set's own images with the checker.
pub fn score_ground_truth(count: usize) -> Result<Tally> {
    let mut tally = Tally::default();
    for i in 0..count as u64 {
        let s = Sample::at(GROUND_TRUTH_SEED, i);
        tally.add(&check(&s.caption, &s.image, 64, 64)?);
    }
    Ok(tally)
}

pub fn evaluate(
    pipeline: &Pipeline,
    options: &EvaluateOptions,
    on_prompt: &mut dyn FnMut(usize, usize),
) -> Result<Report> {
    let mut report = Report {
        ground_truth: score_ground_truth(options.ground_truth_images)?,
        seeds: (options.first_seed, options.seeds),
        ..Default::default()
    };
    (report.autoencoded, report.autoencoded_per_attribute) = score_autoencoded(
        pipeline,
        options.ground_truth_images,
        options.keep_verdicts.then_some(&mut report.verdicts),
    )?;
    let prompts: Vec<(Group, String)> = prompt_set()
        .into_iter()
        .filter(|(g, _)| options.groups.is_empty() || options.groups.contains(g))
        .step_by(options.stride.max(1))
        .collect();
    for (i, (group, prompt)) in prompts.iter().enumerate() {
        on_prompt(i, prompts.len());
        let request = GenerateRequest {
            prompts: vec![prompt.clone()],
            seed: Some(options.first_seed),
            num_images: options.seeds,
            steps: options.steps,
            guidance_scale: options.guidance_scale,
            guidance_rescale: options.guidance_rescale,
            guidance_interval: options.guidance_interval,
            autoguidance: options.autoguidance,
            ..Default::default()
        };
        let generation = pipeline.generate(&request, &mut |_| true)?;
        let (mut cells, mut backgrounds) = (BTreeSet::new(), BTreeSet::new());
        for image in &generation.images {
            let judgement = check(prompt, &image.rgb, image.width, image.height)?;
            report.per_group.entry(*group).or_default().add(&judgement);
            for v in &judgement.verdicts {
                report
                    .per_attribute
                    .entry((*group, v.attribute))
                    .or_default()
                    .count(v.right);
                if options.keep_verdicts {
                    report.verdicts.push(ImageVerdict {
                        group: group.name(),
                        prompt: prompt.clone(),
                        seed: image.seed,
                        shapes_found: judgement.analysis.components.len(),
                        verdict: v.clone(),
                    });
                }
            }
            if *group == Group::TwoShapes {
                report.two_shape_counts[judgement.analysis.components.len().min(3)] += 1;
            }
            backgrounds.insert(judgement.analysis.background);
            if let Some(c) = judgement.analysis.components.first() {
                cells.insert(c.cell);
            }
            report.images += 1;
        }
        if *group == Group::Open {
            report
                .diversity
                .push((prompt.clone(), cells.len(), backgrounds.len()));
        }
    }
    Ok(report)
}

impl Report {
    pub fn print(&self) -> String {
        let mut out = String::new();
        if self.ground_truth.stated == 0 {
            out.push_str("checker on the data set's own images: skipped\n");
        } else {
            out.push_str(&format!(
                "checker on the data set's own images: {:.1} % ({}/{} attributes)\n",
                self.ground_truth.percent(),
                self.ground_truth.right,
                self.ground_truth.stated
            ));
        }
        if self.autoencoded.stated > 0 {
            out.push_str(&format!(
                "checker on them after the model's autoencoder (the ceiling for generated images): {:.1} %\n     ",
                self.autoencoded.percent()
            ));
            for (attr, t) in &self.autoencoded_per_attribute {
                out.push_str(&format!(" {} {:.1} %", attr.name(), t.percent()));
            }
            out.push('\n');
        }
        let (first, count) = self.seeds;
        out.push_str(&format!(
            "adherence over {} images (seeds {first}..={}):\n",
            self.images,
            // Consecutive seeds wrap past u64::MAX, as generation's do.
            first.wrapping_add(count.max(1) as u64 - 1)
        ));
        for (group, t) in &self.per_group {
            out.push_str(&format!(
                "  {:<10} {:5.1} %  ({}/{})\n",
                group.name(),
                t.percent(),
                t.right,
                t.stated
            ));
            for ((g, attr), a) in &self.per_attribute {
                if g == group {
                    out.push_str(&format!(
                        "      {:<10} {:5.1} %  ({}/{})\n",
                        attr.name(),
                        a.percent(),
                        a.right,
                        a.stated
                    ));
                }
            }
            if *group == Group::TwoShapes {
                let [none, one, two, more] = self.two_shape_counts;
                out.push_str(&format!(
                    "      shapes found per image: 0: {none}, 1: {one}, 2: {two}, 3 or more: {more}\n"
                ));
            }
        }
        out.push_str(
            "diversity (open prompts, over the seeds): distinct cells, distinct backgrounds\n",
        );
        for (prompt, cells, bgs) in &self.diversity {
            out.push_str(&format!(
                "  {prompt:<22} {cells} cells, {bgs} backgrounds\n"
            ));
        }
        out
    }
}
