//! Training through the real binary: a short run's loss falls, and a run killed with
//! SIGKILL then resumed gives the same loss curve as an uninterrupted run.

mod common;
mod parity;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::refused;

fn text2img() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_text2img"));
    // Cargo's scratch folder for integration tests, inside target/: `cargo clean` removes it,
    // and nothing is left in the system's temporary folder.
    cmd.env(
        "TEXT2IMG_CACHE",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("text2img-test-cache"),
    );
    cmd
}

fn run(args: &[&str]) {
    let out = text2img().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("loss.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

const VAE: &[&str] = &[
    "--channels",
    "8,16,16",
    "--norm-groups",
    "4",
    "--batch",
    "4",
    "--lr",
    "2e-3",
    "--quiet",
];

fn unet_args<'a>(vae: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--out",
        out,
        "--vae",
        vae,
        "--steps",
        steps,
        "--batch",
        "4",
        "--unet-channels",
        "32,32",
        "--unet-heads",
        "2",
        "--text-hidden",
        "32",
        "--text-layers",
        "1",
        "--text-heads",
        "2",
        "--lr",
        "2e-3",
        "--warmup",
        "5",
        "--save-every",
        "5",
        "--quiet",
    ]
}

/// Asserts a run's loss curve is `full`'s, step for step, up to float noise.
fn assert_same_curve(full: &[f64], other: &[f64]) {
    assert_eq!(other.len(), full.len());
    for (i, (x, y)) in full.iter().zip(other).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
            "step {}: {x} vs {y}",
            i + 1
        );
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn short_runs_learn_and_a_killed_run_resumes_on_the_same_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let vae = tmp.path().join("vae");
    let vae_s = vae.to_str().unwrap();
    let mut args = vec![
        "train-vae",
        "--out",
        vae_s,
        "--steps",
        "40",
        "--save-every",
        "20",
    ];
    args.extend(VAE);
    run(&args);
    let l = losses(&vae);
    assert_eq!(l.len(), 40);
    assert!(
        mean(&l[30..]) < 0.7 * mean(&l[..5]),
        "VAE loss did not fall: {l:?}"
    );
    assert!(vae
        .join("vae/diffusion_pytorch_model.safetensors")
        .is_file());

    // LatentGen, uninterrupted.
    let a = tmp.path().join("a");
    // With samples every 15 steps (the killed run below has none: sampling must not change
    // the loss curve).
    let mut with_samples = unet_args(vae_s, a.to_str().unwrap(), "30");
    with_samples.extend(["--sample-every", "15"]);
    run(&with_samples);
    for step in ["000015", "000030"] {
        let (_, w, h, texts) = parity::read_png(&a.join(format!("samples/step-{step}.png")));
        assert_eq!(
            (w, h),
            (4 * 66 - 2, 4 * 66 - 2),
            "4 captions x 4 seeds of 64x64"
        );
        assert!(texts
            .iter()
            .any(|(k, v)| k == "parameters" && v.starts_with("step ")));
    }
    let full = losses(&a);
    assert_eq!(full.len(), 30);
    assert!(
        mean(&full[20..]) < 0.9 * mean(&full[..5]),
        "diffusion loss did not fall: {full:?}"
    );

    // The same run, killed once it has checkpointed past step 10, then resumed.
    let b = tmp.path().join("b");
    let b_s = b.to_str().unwrap().to_string();
    let mut child = text2img()
        .args(unet_args(vae_s, &b_s, "30"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let state = std::fs::read_to_string(b.join("checkpoint/state.json")).unwrap_or_default();
        let step = serde_json::from_str::<serde_json::Value>(&state)
            .ok()
            .and_then(|v| v["step"].as_u64());
        if step.is_some_and(|s| s >= 10) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it could be killed"
        );
        assert!(started.elapsed() < Duration::from_secs(600));
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The kill landed before the end, and the resumed run went on from the last checkpoint
    // (not from step 0: a restart would give the same curve, training being deterministic).
    let state = std::fs::read_to_string(b.join("checkpoint/state.json")).unwrap();
    let checkpoint_step = serde_json::from_str::<serde_json::Value>(&state).unwrap()["step"]
        .as_u64()
        .unwrap();
    assert!(
        (10..30).contains(&checkpoint_step),
        "killed at step {checkpoint_step}"
    );
    assert!(losses(&b).len() < 30, "the killed run had already finished");
    let mut resume = unet_args(vae_s, &b_s, "30");
    resume.push("--resume");
    let out = text2img().args(&resume).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "resumed from the checkpoint at step {checkpoint_step}\n"
        )),
        "{said}"
    );
    assert_same_curve(&full, &losses(&b));
    // The same run stopped at step 12 by --stop-at (in stages, as the default model's
    // recipe runs), then resumed to its end from a copy of its folder: the same curve again.
    let d = tmp.path().join("d");
    let d_s = d.to_str().unwrap().to_string();
    let mut staged = unet_args(vae_s, &d_s, "30");
    staged.extend(["--stop-at", "12"]);
    run(&staged);
    assert_eq!(losses(&d).len(), 12, "stopped at step 12");
    let state = std::fs::read_to_string(d.join("checkpoint/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        state["step"], 12,
        "a checkpoint at the stop, off the save-every grid"
    );
    // Resumed from a copy of its folder (a fork): the copy carries on, the original stays.
    let e = tmp.path().join("e");
    parity::copy_dir(&d, &e);
    let e_s = e.to_str().unwrap().to_string();
    let mut resume = unet_args(vae_s, &e_s, "30");
    resume.push("--resume");
    run(&resume);
    assert_eq!(
        losses(&d).len(),
        12,
        "the original folder is left as it was"
    );
    assert_same_curve(&full, &losses(&e));
    // The output is a loadable diffusers folder.
    assert_generates_64x64(&b);

    // Fine-tuning starts from the source's weights and architecture: at learning rate 0 the
    // exported U-Net and text encoder are the source's, bit for bit, though the size options
    // ask for another architecture.
    let c = tmp.path().join("c");
    let mut fine_tune = unet_args(vae_s, c.to_str().unwrap(), "2");
    fine_tune.extend(["--init-from", a.to_str().unwrap()]);
    for (flag, value) in [
        ("--lr", "0"),
        ("--unet-channels", "16,16"),
        ("--text-hidden", "16"),
    ] {
        let at = fine_tune.iter().position(|a| *a == flag).unwrap();
        fine_tune[at + 1] = value;
    }
    run(&fine_tune);
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let load = |dir: &Path| {
            candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu).unwrap()
        };
        let (source, tuned) = (load(&a), load(&c));
        assert_eq!(source.len(), tuned.len(), "{file}: tensor count");
        for (name, t) in &source {
            let values = |t: &candle_core::Tensor| {
                let t = t.to_dtype(candle_core::DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert!(values(t) == values(&tuned[name]), "{file}: {name} differs");
        }
    }
    for file in [
        "unet/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer_config.json",
    ] {
        assert!(
            std::fs::read(a.join(file)).unwrap() == std::fs::read(c.join(file)).unwrap(),
            "{file} differs from the source's"
        );
    }
    let (missing, d) = (tmp.path().join("no-such-model"), tmp.path().join("d"));
    let fails_with = |args: &[&str], message: &str| {
        let out = text2img().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(message), "{err}");
    };
    let mut bad = unet_args(vae_s, d.to_str().unwrap(), "2");
    bad.extend(["--init-from", missing.to_str().unwrap()]);
    fails_with(&bad, "needs a model folder with unet/config.json");
    // Fine-tuning into the source folder would overwrite the model it starts from.
    let mut onto_itself = unet_args(vae_s, a.to_str().unwrap(), "2");
    onto_itself.extend(["--init-from", a.to_str().unwrap()]);
    fails_with(&onto_itself, "is the output folder");
    let mut bad_scale = unet_args(vae_s, d.to_str().unwrap(), "2");
    bad_scale.push("--text-lr-scale=-0.5");
    fails_with(&bad_scale, "--text-lr-scale must be a share");
    assert!(a.join("unet/diffusion_pytorch_model.safetensors").is_file());

    // Without --prediction a fine-tuning run keeps its source's targets and schedule (an
    // SD 2.x v-prediction U-Net trained on noise would be ruined); a prediction type training
    // does not know is named.
    let scheduler = a.join("scheduler/scheduler_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&scheduler).unwrap()).unwrap();
    assert_eq!(config["prediction_type"], "epsilon");
    config["prediction_type"] = "v_prediction".into();
    config["rescale_betas_zero_snr"] = true.into();
    std::fs::write(&scheduler, config.to_string()).unwrap();
    let e = tmp.path().join("e");
    let mut keeps = unet_args(vae_s, e.to_str().unwrap(), "1");
    keeps.extend(["--init-from", a.to_str().unwrap()]);
    run(&keeps);
    let tuned: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.join("scheduler/scheduler_config.json")).unwrap())
            .unwrap();
    assert_eq!(tuned["prediction_type"], "v_prediction");
    assert_eq!(tuned["rescale_betas_zero_snr"], true);
    config["prediction_type"] = "sample".into();
    std::fs::write(&scheduler, config.to_string()).unwrap();
    let f = tmp.path().join("f");
    let mut unknown = unet_args(vae_s, f.to_str().unwrap(), "1");
    unknown.extend(["--init-from", a.to_str().unwrap()]);
    fails_with(&unknown, "scheduler predicts `sample`");

    // A wider first convolution (diffusers' `conv_in_kernel`) is written to the config, its
    // weight has that size, and the folder generates; an even size is refused by name.
    let g = tmp.path().join("g");
    let mut wide = unet_args(vae_s, g.to_str().unwrap(), "1");
    wide.extend(["--unet-conv-in-kernel", "5"]);
    run(&wide);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(config["conv_in_kernel"], 5);
    let unet = candle_core::safetensors::load(
        g.join("unet/diffusion_pytorch_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(unet["conv_in.weight"].dims(), &[32, 4, 5, 5]);
    assert_generates_64x64(&g);
    let mut even = unet_args(vae_s, f.to_str().unwrap(), "1");
    even.extend(["--unet-conv-in-kernel", "4"]);
    fails_with(&even, "--unet-conv-in-kernel must be odd");
}

/// The model folder `dir` loads and makes a 64x64 image of a short prompt in two steps.
fn assert_generates_64x64(dir: &std::path::Path) {
    let pipe = text2img::pipeline::load_local(dir, &Default::default()).unwrap();
    let request = text2img::GenerateRequest {
        prompts: vec!["a red circle".into()],
        seed: Some(3),
        steps: Some(2),
        ..Default::default()
    };
    let gen = pipe.generate(&request, &mut |_| true).unwrap();
    assert_eq!((gen.images[0].width, gen.images[0].height), (64, 64));
}

/// Trains a 30-step source autoencoder in `dir/src`, then fine-tunes its decoder into
/// `dir/NAME` for `steps` steps with `extra` options: (source folder, fine-tune folder).
fn source_and_decoder_fine_tune(
    dir: &Path,
    name: &str,
    steps: &str,
    extra: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (src, ft) = (dir.join("src"), dir.join(name));
    let mut args = vec!["train-vae", "--out", src.to_str().unwrap(), "--steps", "30"];
    args.extend(VAE);
    run(&args);
    let source = src.join("vae");
    let mut args = vec![
        "train-vae",
        "--out",
        ft.to_str().unwrap(),
        "--finetune-decoder",
        source.to_str().unwrap(),
        "--steps",
        steps,
        "--batch",
        "4",
        "--quiet",
    ];
    args.extend(extra);
    run(&args);
    (src, ft)
}

/// `train-vae --finetune-decoder`: the source's encoder comes through bit for bit, its decoder
/// starts from the source's weights (not random ones) and changes, the scaling factor is kept.
#[test]
fn decoder_fine_tuning_keeps_the_encoder_and_the_latent_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, ft) = source_and_decoder_fine_tune(tmp.path(), "ft", "6", &[]);
    let load = |dir: &Path| {
        candle_core::safetensors::load(
            dir.join("vae/diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (before, after) = (load(&src), load(&ft));
    assert_eq!(before.len(), after.len());
    let mut decoder_changed = false;
    for (name, a) in &before {
        let b = &after[name];
        let values = |t: &candle_core::Tensor| {
            t.to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let same = values(a) == values(b);
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            decoder_changed |= !same;
        } else {
            assert!(same, "encoder tensor {name} changed");
        }
    }
    assert!(decoder_changed, "no decoder tensor changed");
    let scale = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("vae/config.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["scaling_factor"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(scale(&src), scale(&ft));
    // Starting from the trained decoder, the first loss is near the source's last ones, far
    // below a random decoder's first.
    let (trained, tuned) = (losses(&src), losses(&ft));
    assert!(
        tuned[0] < 0.5 * trained[0],
        "fine-tuning did not start from the source's weights: {tuned:?} vs {trained:?}"
    );
}

/// `train-vae --finetune-decoder --widen 2`: the exported autoencoder has twice the channels
/// and gives the source's latents; the fine-tune starts from the source's images.
#[test]
fn widened_decoder_fine_tune_keeps_the_latents() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "--widen",
        "2",
        "--latent-noise",
        "0.05",
        "--visible-error-weight",
        "2",
        "--decode-mean",
    ];
    let (src, wide) = source_and_decoder_fine_tune(tmp.path(), "wide", "3", &extra);
    let source = src.join("vae");
    let device = candle_core::Device::Cpu;
    let small = text2img::vae::AutoencoderKl::load(&source, None, &device).unwrap();
    let widened = text2img::vae::AutoencoderKl::load(&wide.join("vae"), None, &device).unwrap();
    assert_eq!(widened.config.block_out_channels, [16, 32, 32]);
    assert_eq!(widened.config.norm_num_groups, 8);
    let images: Vec<Vec<u8>> = (0..2)
        .map(|i| text2img::train::shapes::Sample::at(9, i).image)
        .collect();
    let x = text2img::train::data::images_to_tensor(&images, 64, &device).unwrap();
    let (a, _) = small.encode(&x).unwrap();
    let (b, _) = widened.encode(&x).unwrap();
    let max_abs = |t: &candle_core::Tensor| -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    };
    let (diff, norm) = (max_abs(&(&a - &b).unwrap()), max_abs(&a));
    // fp16-exact is not promised by the export, so a relative bound.
    assert!(
        diff <= 1e-3 * norm.max(1.0),
        "latents differ by {diff} (max {norm})"
    );
    // With the visible-error loss the log has its column, and the decoder's loss is the
    // mean squared error plus the weighted visible error.
    let log = std::fs::read_to_string(wide.join("loss.csv")).unwrap();
    assert!(log.starts_with("step,loss,mse,kl,visible\n"), "{log}");
    let mut tuned = vec![];
    for line in log.lines().skip(1) {
        let v: Vec<f64> = line.split(',').map(|f| f.parse().unwrap()).collect();
        assert!(v[4] > 0.0, "{line}");
        assert!((v[1] - (v[2] + 2.0 * v[4])).abs() <= 1e-6 * v[1], "{line}");
        tuned.push(v[2]);
    }
    // The fine-tune's first mean squared error against the source's first loss (its mean
    // squared error plus a negligible KL term, from random weights): a decoder that started
    // from random weights would begin where the source began.
    let trained = losses(&src);
    assert!(
        tuned[0] < 0.6 * trained[0],
        "the widened decoder did not start from the source's images: {tuned:?} vs {trained:?}"
    );
    // Resuming with another source (here the widened output itself, which --widen 2 would
    // widen again) is refused before anything in the run's folder changes.
    let config = std::fs::read(wide.join("vae/config.json")).unwrap();
    let wide_vae = wide.join("vae");
    let err = refused(
        text2img()
            .args(["train-vae", "--out", wide.to_str().unwrap()])
            .args(["--resume", "--steps", "4"])
            .args(["--finetune-decoder", wide_vae.to_str().unwrap()]),
    );
    assert!(err.contains("not the one this run started from"), "{err}");
    assert_eq!(std::fs::read(wide.join("vae/config.json")).unwrap(), config);
    // Latent noise and widening only make sense for a decoder fine-tune.
    let err = refused(
        text2img()
            .args(["train-vae", "--out", tmp.path().join("x").to_str().unwrap()])
            .args(["--latent-noise", "0.1", "--steps", "1"]),
    );
    assert!(
        err.contains("--latent-noise") && err.contains("--finetune-decoder"),
        "{err}"
    );
    let err = refused(
        text2img()
            .args(["train-vae", "--out", tmp.path().join("x").to_str().unwrap()])
            .args(["--visible-error-weight=-1", "--steps", "1"]),
    );
    assert!(err.contains("--visible-error-weight -1"), "{err}");
    let err = refused(
        text2img()
            .args(["train-vae", "--out", tmp.path().join("x").to_str().unwrap()])
            .args(["--decode-mean", "--steps", "1"]),
    );
    assert!(
        err.contains("--decode-mean") && err.contains("--finetune-decoder"),
        "{err}"
    );
    assert!(
        !tmp.path().join("x").exists(),
        "a refused run left a folder behind"
    );
}

#[test]
fn the_checker_scores_the_data_set_itself_at_100_percent() {
    let tally = text2img::train::evaluate::score_ground_truth(500).unwrap();
    assert_eq!(tally.right, tally.stated);
    assert!(tally.stated > 1500);
}
