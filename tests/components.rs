//! TextEnc, LatentGen's U-Net and Dec, each against the tensors diffusers produced for the
//! same tiny random-weight models (tests/fixtures, made by scripts/make-fixtures).

mod parity;

use candle_core::{DType, Device};
use parity::{assert_close, model_dir, reference};
use text2img::latent::unet::UNet;
use text2img::text::clip::ClipTextModel;
use text2img::vae::AutoencoderKl;

fn ids(name: &str) -> Vec<Vec<u32>> {
    let t = reference(name).to_dtype(DType::I64).unwrap();
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

#[test]
fn text_encoder_matches_transformers() {
    for (model, name) in [("sd1-tiny", "sd1"), ("sd2-tiny", "sd2")] {
        let enc = ClipTextModel::load(&model_dir(model).join("text_encoder"), None, &Device::Cpu)
            .unwrap();
        let ids = ids(&format!("{name}.text.ids"));
        assert_close(
            &format!("{name} last layer"),
            &enc.forward(&ids, 0).unwrap(),
            &reference(&format!("{name}.text.last")),
        );
        assert_close(
            &format!("{name} clip skip 1"),
            &enc.forward(&ids, 1).unwrap(),
            &reference(&format!("{name}.text.skip1")),
        );
    }
}

#[test]
fn unet_matches_diffusers_square_and_odd_sizes() {
    for (model, name) in [("sd1-tiny", "sd1"), ("sd2-tiny", "sd2")] {
        let unet = UNet::load(&model_dir(model).join("unet"), None, &Device::Cpu).unwrap();
        for size in ["8x8", "9x7"] {
            let key = format!("{name}.unet.{size}");
            let out = unet
                .forward(
                    &reference(&format!("{key}.sample")),
                    421.0,
                    &reference(&format!("{key}.context")),
                )
                .unwrap();
            assert_close(&key, &out, &reference(&format!("{key}.out")));
        }
    }
}

/// `resnet_time_scale_shift: "scale_shift"`: the timestep scales and shifts the normalised
/// features of every ResNet block (scripts/fixtures/unet_scale_shift.py).
#[test]
fn unet_with_time_scale_shift_matches_diffusers() {
    let unet = UNet::load(&model_dir("unet-scale-shift"), None, &Device::Cpu).unwrap();
    let path = parity::fixtures().join("reference/unet_scale_shift.safetensors");
    let refs = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for t in [37, 911] {
        let out = unet
            .forward(&refs["sample"], t as f64, &refs["context"])
            .unwrap();
        assert_close(
            &format!("scale-shift U-Net at t = {t}"),
            &out,
            &refs[&format!("out.{t}")],
        );
    }
}

#[test]
fn vae_decode_and_encode_match_diffusers() {
    for (model, name) in [("sd1-tiny", "sd1"), ("sd2-tiny", "sd2")] {
        let vae = AutoencoderKl::load(&model_dir(model).join("vae"), None, &Device::Cpu).unwrap();
        let decoded = vae.decode(&reference(&format!("{name}.vae.z"))).unwrap();
        assert_close(
            &format!("{name} decode"),
            &decoded,
            &reference(&format!("{name}.vae.decoded")),
        );
        let (mean, logvar) = vae.encode(&reference(&format!("{name}.vae.x"))).unwrap();
        assert_close(
            &format!("{name} encode mean"),
            &mean,
            &reference(&format!("{name}.vae.mean")),
        );
        assert_close(
            &format!("{name} encode logvar"),
            &logvar,
            &reference(&format!("{name}.vae.logvar")),
        );
    }
}

/// The U-Net's batch in shards (one per thread, as generation runs classifier-free guidance)
/// gives every row exactly what one pass over the whole batch gives.
#[test]
fn unet_in_shards_equals_one_pass() {
    use candle_core::Tensor;
    use text2img::latent::unet::ExtraConditions;
    let unet = UNet::load(&model_dir("sd1-tiny").join("unet"), None, &Device::Cpu).unwrap();
    let sample = reference("sd1.unet.9x7.sample");
    let context = reference("sd1.unet.9x7.context");
    // Three copies of the fixture's rows, each with its own noise and context (an odd number
    // of rows when the fixture has one: an uneven split over two threads).
    let sample = Tensor::cat(
        &[&sample, &(&sample * -0.5).unwrap(), &sample.sqr().unwrap()],
        0,
    )
    .unwrap();
    let context = Tensor::cat(
        &[
            &context,
            &(&context * 2.0).unwrap(),
            &context.neg().unwrap(),
        ],
        0,
    )
    .unwrap();
    let t: Vec<f64> = (0..sample.dim(0).unwrap())
        .map(|i| [421.0, 17.0, 999.0][i % 3])
        .collect();
    let extra = ExtraConditions::default();
    let whole = unet
        .forward_conditioned(&sample, &t, &context, &extra)
        .unwrap();
    let sharded = unet.forward_sharded(&sample, &t, &context, &extra).unwrap();
    let narrowed = |n: usize| {
        let (s, c) = (
            sample.narrow(0, 0, n).unwrap(),
            context.narrow(0, 0, n).unwrap(),
        );
        unet.forward_sharded(&s, &t[..n], &c, &extra).unwrap()
    };
    let identical = |a: &Tensor, b: &Tensor| {
        assert_eq!(a.dims(), b.dims());
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(a == b, "the shards' rows differ from one pass's");
    };
    identical(&whole, &sharded);
    // And an odd batch of three rows.
    identical(&narrowed(3), &whole.narrow(0, 0, 3).unwrap());
}
