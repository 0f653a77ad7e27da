//! The built-in model: a fresh user's first command works with no --model and no files, and
//! `evaluate` on the shipped model stays at its measured level (a small sample, thresholds a
//! little under the figures measured when it was trained; see scripts/train-default-model).

mod common;

use std::process::Command;

use common::refused;

/// The shipped autoencoder's ceiling measured on the test's 200 images: 97.1 % (the
/// narrower decoder before it: 94.9 %).
const CEILING_FLOOR: f64 = 95.0;

fn text2img(cache: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_text2img"));
    cmd.env("TEXT2IMG_CACHE", cache).env("HOME", cache);
    cmd
}

/// Runs `cmd` and asserts that it exits successfully (showing its stderr if not).
fn succeeds(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn generate_works_with_no_model_and_no_files_around() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    succeeds(text2img(cache.path()).current_dir(work.path()).args([
        "generate",
        "--prompt",
        "a red circle on a blue background",
        "--seed",
        "3",
        "--output",
        "out.png",
    ]));
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(work.path().join("out.png")).unwrap(),
    ));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (64, 64));
    let params = &info.uncompressed_latin1_text[0].text;
    assert!(
        params.contains("Model: text2img-default-shapes"),
        "{params}"
    );
    assert!(params.contains("Sampler: DPM++ 2M"), "{params}");
}

/// (group, measured adherence %) lines of `evaluate`'s report.
fn adherence(report: &str) -> Vec<(String, f64)> {
    report
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("      ") && l.contains('%'))
        .map(|l| {
            let mut parts = l.split_whitespace();
            (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// `text2img evaluate ARGS` on the built-in model, asserted to succeed: its report.
fn evaluate_report(args: &[&str]) -> String {
    let cache = tempfile::tempdir().unwrap();
    let out = succeeds(text2img(cache.path()).arg("evaluate").args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The small sample the shipped model is checked on: every STRIDE-th prompt of the set.
const STRIDE: usize = 7;

#[test]
fn evaluate_on_the_shipped_model() {
    let stride = STRIDE.to_string();
    let report = evaluate_report(&["--stride", &stride, "--seeds", "2", "--ground-truth", "200"]);
    assert!(
        report.contains("data set's own images: 100.0 %"),
        "{report}"
    );
    // The shipped autoencoder's reconstructions: the ceiling for generated images.
    let ceiling: f64 = report
        .lines()
        .find_map(|l| l.split("after the model's autoencoder").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|v| v.trim_end_matches(" %").trim().parse().ok())
        .unwrap_or_else(|| panic!("no autoencoder line in\n{report}"));
    assert!(
        ceiling >= CEILING_FLOOR,
        "autoencoder ceiling {ceiling} %\n{report}"
    );
    let groups = adherence(&report);
    assert_eq!(groups.len(), 3, "{report}");
    // Every two-shape image is counted once by how many shapes it showed.
    let two_shape_prompts = text2img::train::evaluate::prompt_set()
        .into_iter()
        .step_by(STRIDE)
        .filter(|(g, _)| *g == text2img::train::evaluate::Group::TwoShapes)
        .count();
    let found: usize = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("shapes found per image: "))
        .unwrap_or_else(|| panic!("no shapes-found line in\n{report}"))
        .split(", ")
        .map(|part| part.rsplit(": ").next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(found, 2 * two_shape_prompts, "{report}");
    // Measured on this sample when the model was exported (the mean of four fine-tunes, U-Net
    // steps 61,350 to 68,850: step 22,650 grafted with the place-word curriculum, fine-tuned
    // on the whole grammar, then with two-shape images mixed in, and the widened decoder; 12
    // steps, guidance 3 over the first 80 % of them, autoguidance 2.5 by the small guide
    // U-Net): seen 97.1 % (33/34), held-out 94.4 % (17/18), two-shape 90.0 % (18/20); the
    // floors allow three, two and two attributes less (another CPU's float rounding can flip
    // an attribute or two). This small sample moves more than the full set: with guidance on
    // every step the same U-Net scored 65.0 % two-shape here and 76.7 % over 16 seeds, with
    // the interval 85.0 here and 78.9 % over 16, with autoguidance too 90.0 here and 78.4 %
    // over 16.
    for (group, floor) in [("seen", 88.0), ("held-out", 83.0), ("two-shape", 80.0)] {
        let percent = groups
            .iter()
            .find(|(g, _)| g == group)
            .map(|(_, p)| *p)
            .unwrap();
        assert!(
            percent >= floor,
            "{group}: {percent} % < {floor} %\n{report}"
        );
    }
}

#[test]
fn evaluate_runs_only_the_named_group() {
    let report = evaluate_report(&["--group", "open", "--seeds", "1", "--ground-truth", "0"]);
    let groups: Vec<String> = adherence(&report).into_iter().map(|(g, _)| g).collect();
    assert_eq!(groups, ["open"], "{report}");
    // The four open prompts, one image each.
    assert!(
        report.contains("adherence over 4 images (seeds 1000..=1000)"),
        "{report}"
    );
    let cache = tempfile::tempdir().unwrap();
    let err = refused(text2img(cache.path()).args([
        "evaluate",
        "--group",
        "unseen",
        "--ground-truth",
        "0",
    ]));
    assert!(err.contains("unknown prompt group `unseen`"), "{err}");
}

#[test]
fn evaluate_first_seed_moves_the_seed_range() {
    // Settings chosen on other seeds than the ones the goals are measured on: the report and
    // every verdict name the seeds the images were made with.
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("details.csv");
    let report = evaluate_report(&[
        "--group",
        "open",
        "--seeds",
        "2",
        "--first-seed",
        "2000",
        "--ground-truth",
        "0",
        "--details",
        csv_path.to_str().unwrap(),
    ]);
    assert!(
        report.contains("adherence over 8 images (seeds 2000..=2001)"),
        "{report}"
    );
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut seeds: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap())
        .collect();
    seeds.sort();
    seeds.dedup();
    assert_eq!(seeds, ["2000", "2001"], "{csv}");
}

#[test]
fn evaluate_details_list_every_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("details.csv");
    let csv_arg = csv_path.to_str().unwrap();
    let report = evaluate_report(&[
        "--group",
        "open",
        "--seeds",
        "1",
        "--ground-truth",
        "10",
        "--details",
        csv_arg,
    ]);
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("group,prompt,seed,shapes_found,attribute,shape,stated,seen,right")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(rows.iter().all(|r| r.len() == 9), "{csv}");
    // Open prompts state a color and a kind: 4 prompts, one image each, two verdicts each,
    // and as many right as the report's pooled figure says.
    let open: Vec<_> = rows.iter().filter(|r| r[0] == "open").collect();
    assert_eq!(open.len(), 8, "{csv}");
    let right = open.iter().filter(|r| r[8] == "true").count();
    assert!(report.contains(&format!("({right}/8)")), "{report}\n{csv}");
    assert!(
        open.iter().all(|r| ["color", "kind"].contains(&r[4])),
        "{csv}"
    );
    // The autoencoded data set images: one row per attribute their captions state, the
    // count the ground-truth line reports for the same ten images.
    let autoencoded = rows.iter().filter(|r| r[0] == "autoencoded").count();
    assert!(
        report.contains(&format!("/{autoencoded} attributes)")),
        "{autoencoded} autoencoded rows\n{report}"
    );

    // A details file that cannot be written fails before any image is made.
    let cache = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder").join("d.csv");
    let err = refused(
        text2img(cache.path())
            .args(["evaluate", "--ground-truth", "0", "--details"])
            .arg(&missing),
    );
    assert!(
        err.contains("no-such-folder") && err.contains("does not exist"),
        "{err}"
    );
}

/// The pixels of a generated image that differ from its most common color (the flat
/// background): their centroid, in pixels from the top left.
fn shape_centroid(path: &std::path::Path) -> (f64, f64) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let (w, h) = (info.width as usize, info.height as usize);
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let pixel = |i: usize| [buf[3 * i], buf[3 * i + 1], buf[3 * i + 2]];
    let mut counts = std::collections::HashMap::new();
    for i in 0..w * h {
        *counts.entry(pixel(i)).or_insert(0usize) += 1;
    }
    let background = counts.into_iter().max_by_key(|&(_, n)| n).unwrap().0;
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
    for i in 0..w * h {
        let p = pixel(i);
        let distance: i32 = (0..3)
            .map(|c| (i32::from(p[c]) - i32::from(background[c])).abs())
            .sum();
        if distance > 96 {
            sx += (i % w) as f64 + 0.5;
            sy += (i / w) as f64 + 0.5;
            n += 1.0;
        }
    }
    assert!(n > 0.0, "{}: no shape found", path.display());
    (sx / n, sy / n)
}

/// The place words move the shape: averaged over four seeds, "in the top left" puts it in
/// the top-left quarter and "in the bottom right" in the bottom-right one (the cells' centres
/// are about 18 and 46 px; a shipped model before the place-word curriculum put both near
/// the middle, wherever the seed put them).
#[test]
fn place_words_move_the_shape() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mean_centroid = |place: &str, name: &str| {
        succeeds(text2img(cache.path()).current_dir(work.path()).args([
            "generate",
            "--prompt",
            &format!("a red circle {place} on a blue background"),
            "--seed",
            "0",
            "--num-images",
            "4",
            "--output",
            &format!("{name}.png"),
        ]));
        let centroids: Vec<(f64, f64)> = (1..=4)
            .map(|i| shape_centroid(&work.path().join(format!("{name}-{i}.png"))))
            .collect();
        let mean = |f: fn(&(f64, f64)) -> f64| centroids.iter().map(f).sum::<f64>() / 4.0;
        ((mean(|c| c.0), mean(|c| c.1)), centroids)
    };
    let (top_left, all) = mean_centroid("in the top left", "tl");
    assert!(top_left.0 < 28.0 && top_left.1 < 28.0, "top left: {all:?}");
    let (bottom_right, all) = mean_centroid("in the bottom right", "br");
    assert!(
        bottom_right.0 > 36.0 && bottom_right.1 > 36.0,
        "bottom right: {all:?}"
    );
}
