//! The `canny` preprocessor against OpenCV's `cv2.Canny` on the same pictures
//! (scripts/fixtures/canny.py): several pictures, odd sizes, four threshold pairs.

mod parity;

use parity::fixtures;
use serde_json::Value;

#[test]
fn edge_maps_equal_opencvs() {
    let dir = fixtures().join("canny");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for case in meta["cases"].as_array().unwrap() {
        let picture = image::open(dir.join(case["input"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (low, high) = (
            case["low"].as_f64().unwrap(),
            case["high"].as_f64().unwrap(),
        );
        let ours = text2img::canny::canny(&picture, low, high);
        let theirs = image::open(dir.join(case["edges"].as_str().unwrap()))
            .unwrap()
            .to_luma8();
        let differ = ours
            .pixels()
            .zip(theirs.pixels())
            .filter(|(a, b)| a != b)
            .count();
        let on = ours.pixels().filter(|p| p.0[0] == 255).count();
        eprintln!(
            "{} {low}/{high}: {on} edge pixels, {differ} differ from OpenCV's",
            case["input"]
        );
        assert_eq!(differ, 0, "{case}");
        assert_eq!(on as u64, case["on"].as_u64().unwrap());
    }
}

#[test]
fn thresholds_matter_and_flat_pictures_have_no_edges() {
    let dir = fixtures().join("canny");
    let picture = image::open(dir.join("photo-a.png")).unwrap().to_rgb8();
    let count = |low, high| {
        text2img::canny::canny(&picture, low, high)
            .pixels()
            .filter(|p| p.0[0] == 255)
            .count()
    };
    assert!(count(20.0, 60.0) > count(100.0, 200.0));
    // Swapped thresholds are taken in order.
    assert_eq!(count(200.0, 100.0), count(100.0, 200.0));
    let flat = image::RgbImage::from_pixel(17, 9, image::Rgb([90, 120, 30]));
    assert!(text2img::canny::canny(&flat, 1.0, 2.0)
        .pixels()
        .all(|p| p.0[0] == 0));
}
