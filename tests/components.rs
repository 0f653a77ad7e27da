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
