//! The torch-compatible generator against draws recorded from PyTorch
//! (tests/fixtures/rng.json, made by scripts/fixtures/rng.py), for both of torch's
//! random-normal kernels.

mod common;

use candle_core::Device;
use common::{f32_base64, read_fixture, ulp_distance};
use text2img::rng::{BatchGenerator, NormalKernel, TorchGenerator};

fn assert_same(ours: &[f32], reference: &[f32], what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let mismatches: Vec<String> = ours
        .iter()
        .zip(reference)
        .enumerate()
        .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
        .take(5)
        .map(|(i, (a, b))| {
            format!(
                "[{i}] ours {a:e} torch {b:e} ({} ulp)",
                ulp_distance(*a, *b)
            )
        })
        .collect();
    assert!(mismatches.is_empty(), "{what}: {}", mismatches.join(", "));
}

fn kernel_named(name: &str) -> NormalKernel {
    match name {
        "Avx2" => NormalKernel::Avx2,
        "Scalar" => NormalKernel::Scalar,
        other => panic!("unknown kernel {other}"),
    }
}

fn to_vec(t: candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn randn_matches_torch_bit_for_bit() {
    let fixture = read_fixture("rng.json");
    let sizes: Vec<usize> = fixture["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let mut checked = 0;
    for kernel_case in fixture["kernels"].as_array().unwrap() {
        let kernel = kernel_named(kernel_case["kernel"].as_str().unwrap());
        for case in kernel_case["seeds"].as_array().unwrap() {
            let seed = case["seed"].as_u64().unwrap();
            let what = format!("{kernel:?} seed {seed}");

            let reference = f32_base64(case["fresh"].as_str().unwrap());
            let mut offset = 0;
            for &n in &sizes {
                let ours = TorchGenerator::with_kernel(seed, kernel).randn_vec(n);
                assert_same(
                    &ours,
                    &reference[offset..offset + n],
                    &format!("{what} randn({n})"),
                );
                offset += n;
            }

            let reference = f32_base64(case["sequence"].as_str().unwrap());
            let mut g = TorchGenerator::with_kernel(seed, kernel);
            let mut offset = 0;
            for &n in &sizes {
                let ours = g.randn_vec(n);
                let label = format!("{what} randn({n}) in sequence");
                assert_same(&ours, &reference[offset..offset + n], &label);
                offset += n;
            }

            let reference = f32_base64(case["big"].as_str().unwrap());
            let ours = TorchGenerator::with_kernel(seed, kernel)
                .randn(&[4, 64, 64], &Device::Cpu)
                .unwrap();
            assert_same(&to_vec(ours), &reference, &format!("{what} 4x64x64"));

            let reference = f32_base64(case["batch2"].as_str().unwrap());
            let ours = BatchGenerator::consecutive_with_kernel(seed, 2, kernel)
                .randn(&[2, 4, 3, 5], &Device::Cpu)
                .unwrap();
            assert_same(&to_vec(ours), &reference, &format!("{what} batch of 2"));
            checked += 1;
        }
    }
    assert!(checked >= 4, "the fixture covers both kernels");
}

#[test]
fn batch_generator_rejects_a_wrong_batch() {
    let mut g = BatchGenerator::consecutive(0, 2);
    assert!(g.randn(&[3, 4], &Device::Cpu).is_err());
}
