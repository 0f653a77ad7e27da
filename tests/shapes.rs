//! The `shapes` data set: the generator follows the spec's rules, and the checker scores
//! the data set's own images 100 % while catching wrong captions on the right attribute.

use std::collections::HashSet;

use text2img::train::checker::{check, Attribute, Judgement};
use text2img::train::shapes::{
    caption_for, write_dataset, write_selection, Cell, Color, Kind, PromptSpec, Relation, Sample,
    Selection, ShapeSpec, ShapesStream, Size, HELD_OUT,
};

fn samples(seed: u64, count: usize) -> impl Iterator<Item = Sample> {
    ShapesStream::new(seed).take(count)
}

fn judge(caption: &str, sample: &Sample) -> Judgement {
    check(caption, &sample.image, 64, 64).unwrap_or_else(|e| panic!("{caption}: {e}"))
}

#[test]
fn checker_scores_the_data_set_100_percent() {
    let (mut stated, mut right) = (0, 0);
    for (i, sample) in samples(2024, 2000).enumerate() {
        // The training caption, and the caption stating everything.
        for caption in [
            sample.caption.clone(),
            caption_for(&PromptSpec::full(&sample.scene)),
        ] {
            let judgement = judge(&caption, &sample);
            let wrong: Vec<_> = judgement.wrong().collect();
            assert!(
                wrong.is_empty(),
                "sample {i} {caption:?}: {wrong:?}\n{:?}",
                sample.scene
            );
            stated += judgement.stated();
            right += judgement.right();
        }
    }
    assert_eq!(stated, right);
    assert!(stated > 2000 * 5, "too few stated attributes: {stated}");
}

#[test]
fn same_seed_same_data_other_seed_other_data() {
    let a: Vec<Sample> = samples(7, 300).collect();
    let b: Vec<Sample> = samples(7, 300).collect();
    assert_eq!(a, b);
    let c: Vec<Sample> = samples(8, 300).collect();
    let same_caption = a
        .iter()
        .zip(&c)
        .filter(|(x, y)| x.caption == y.caption)
        .count();
    let same_image = a.iter().zip(&c).filter(|(x, y)| x.image == y.image).count();
    assert!(
        same_caption < 30 && same_image == 0,
        "seeds 7 and 8 agree too often"
    );
    // Different positions of one stream differ too.
    assert!(a.windows(2).all(|w| w[0].image != w[1].image));
}

#[test]
fn seeking_resumes_at_the_same_data_position() {
    let mut stream = ShapesStream::new(99);
    for _ in 0..57 {
        stream.next_sample();
    }
    assert_eq!(stream.position(), 57);
    let mut resumed = ShapesStream::seek(99, stream.position());
    for _ in 0..20 {
        assert_eq!(stream.next_sample(), resumed.next_sample());
    }
    assert_eq!(resumed.position(), 77);
}

#[test]
fn pinned_first_samples() {
    // The stream is part of the data set's definition: it must not change silently.
    let first: Vec<Sample> = samples(0, 3).collect();
    let captions: Vec<&str> = first.iter().map(|s| s.caption.as_str()).collect();
    // FNV-1a over the three images.
    let hash = first
        .iter()
        .flat_map(|s| &s.image)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    assert_eq!(
        captions,
        [
            "a blue triangle in the bottom left",
            "a large purple triangle in the top right on an orange background",
            "a purple triangle"
        ]
    );
    assert_eq!(hash, PINNED_HASH, "images changed: {hash:#x}");
}

const PINNED_HASH: u64 = 0xce47_082a_2b00_b1ef;

#[test]
fn held_out_combinations_never_appear() {
    let held_out_phrases: Vec<String> = HELD_OUT
        .iter()
        .map(|(c, k)| format!("{} {}", c.name(), k.name()))
        .collect();
    for sample in samples(5, 20_000) {
        for shape in &sample.scene.shapes {
            assert!(
                !HELD_OUT.contains(&(shape.color, shape.kind)),
                "{:?}",
                sample.scene
            );
        }
        assert!(!sample.prompt.is_held_out());
        for phrase in &held_out_phrases {
            assert!(
                !sample.caption.contains(phrase.as_str()),
                "{}",
                sample.caption
            );
        }
    }
}

#[test]
fn scenes_follow_the_rules() {
    for sample in samples(11, 5000) {
        let scene = &sample.scene;
        assert_eq!(sample.image.len(), 64 * 64 * 3);
        assert_eq!(
            scene.shapes.len(),
            if scene.relation.is_some() { 2 } else { 1 }
        );
        for shape in &scene.shapes {
            assert_ne!(shape.color, scene.background, "{scene:?}");
            let b = shape.bbox;
            let (lo, hi) = shape.size.widths();
            assert!((lo..=hi).contains(&b.width()), "{scene:?}");
            assert!(
                b.xmin >= 1 && b.ymin >= 1 && b.xmax <= 62 && b.ymax <= 62,
                "{scene:?}"
            );
            let (cx, cy) = b.centre();
            let third = 64.0 / 3.0;
            let (col, row) = (f32::from(shape.cell.col), f32::from(shape.cell.row));
            assert!(
                cx >= col * third + 2.0 && cx <= (col + 1.0) * third - 2.0,
                "{scene:?}"
            );
            assert!(
                cy >= row * third + 2.0 && cy <= (row + 1.0) * third - 2.0,
                "{scene:?}"
            );
        }
        if let Some(relation) = scene.relation {
            let (a, b) = (&scene.shapes[0], &scene.shapes[1]);
            assert!(a.size == Size::Small && b.size == Size::Small);
            assert!(a.bbox.gap(&b.bbox) >= 4, "{scene:?}");
            let ((ax, ay), (bx, by)) = (a.bbox.centre(), b.bbox.centre());
            let (main, cross) = match relation {
                Relation::LeftOf => (bx - ax, by - ay),
                Relation::Above => (by - ay, bx - ax),
            };
            assert!(main >= 12.0 && cross.abs() <= main / 2.0, "{scene:?}");
        }
        for bad in [
            "a orange", "a an", " an red", " an s", " an l", "an b", "an g", "an y", "an p",
            "an w", "an r",
        ] {
            assert!(!sample.caption.contains(bad), "{}", sample.caption);
        }
    }
}

#[test]
fn distribution_is_sane() {
    let n = 6000;
    let mut two = 0;
    let mut backgrounds = HashSet::new();
    let mut looks = HashSet::new();
    let mut cells = HashSet::new();
    let (mut sizes_stated, mut positions_stated, mut backgrounds_stated, mut one) = (0, 0, 0, 0);
    for sample in samples(3, n) {
        backgrounds.insert(sample.scene.background);
        for shape in &sample.scene.shapes {
            looks.insert((shape.color, shape.kind));
            cells.insert(shape.cell);
        }
        two += usize::from(sample.scene.relation.is_some());
        backgrounds_stated += usize::from(sample.prompt.background().is_some());
        if let PromptSpec::One { size, position, .. } = sample.prompt {
            one += 1;
            sizes_stated += usize::from(size.is_some());
            positions_stated += usize::from(position.is_some());
        }
    }
    let frac = |k: usize, of: usize| k as f64 / of as f64;
    assert!(
        (0.30..0.37).contains(&frac(two, n)),
        "two-shape fraction {}",
        frac(two, n)
    );
    assert_eq!(backgrounds.len(), 8, "backgrounds seen: {backgrounds:?}");
    assert_eq!(
        looks.len(),
        8 * 3 - HELD_OUT.len(),
        "color-kind pairs seen: {looks:?}"
    );
    assert_eq!(cells.len(), 9);
    for (what, k, of) in [
        ("size", sizes_stated, one),
        ("position", positions_stated, one),
        ("background", backgrounds_stated, n),
    ] {
        assert!(
            (0.46..0.54).contains(&frac(k, of)),
            "{what} stated in {} of captions",
            frac(k, of)
        );
    }
}

#[test]
fn write_dataset_writes_decodable_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shapes");
    write_dataset(12, 42, &out).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 24, "{names:?}");
    assert_eq!(
        (names[0].as_str(), names[1].as_str()),
        ("00000.png", "00000.txt")
    );
    for (i, sample) in samples(42, 12).enumerate() {
        let caption = std::fs::read_to_string(out.join(format!("{i:05}.txt"))).unwrap();
        assert_eq!(caption, sample.caption);
        let file = std::fs::File::open(out.join(format!("{i:05}.png"))).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (64, 64));
        assert_eq!(
            (info.color_type, info.bit_depth),
            (png::ColorType::Rgb, png::BitDepth::Eight)
        );
        assert_eq!(&buf[..info.buffer_size()], &sample.image[..]);
    }
}

#[test]
fn a_selection_keeps_one_shape_images_in_its_cells_with_full_captions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("corners");
    let cells = Selection::parse_cells("top left, bottom right").unwrap();
    let selection = Selection {
        cells: Some(cells.clone()),
        two_shapes: false,
        full_captions: true,
    };
    let written = write_selection(300, 7, &selection, &out).unwrap();
    let mut kept = 0;
    for (i, sample) in samples(7, 300).enumerate() {
        let caption = out.join(format!("{i:05}.txt"));
        let wanted =
            sample.scene.relation.is_none() && cells.contains(&sample.scene.shapes[0].cell);
        assert_eq!(caption.exists(), wanted, "sample {i}: {}", sample.caption);
        if !wanted {
            continue;
        }
        kept += 1;
        // Every attribute is stated (size, color, kind, row, column, background), and the
        // checker finds all of them right.
        let caption = std::fs::read_to_string(caption).unwrap();
        let judgement = judge(&caption, &sample);
        assert_eq!(judgement.stated(), 6, "{caption}: {judgement:?}");
        assert_eq!(judgement.right(), 6, "{caption}: {judgement:?}");
    }
    assert_eq!(written, kept);
    // Two cells of nine, two-thirds of the images with one shape: about 44 of 300.
    assert!((25..70).contains(&kept), "kept {kept}");

    let unknown = Selection::parse_cells("top left,middle")
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("unknown cell `middle`"), "{unknown}");
    assert_eq!(Selection::parse_cells("all").unwrap(), Cell::ALL.to_vec());
}

#[test]
fn a_two_shape_selection_keeps_exactly_the_two_shape_images() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("two");
    let selection = Selection {
        two_shapes: true,
        ..Selection::default()
    };
    let written = write_selection(120, 9, &selection, &out).unwrap();
    let mut kept = 0;
    for (i, sample) in samples(9, 120).enumerate() {
        let caption = out.join(format!("{i:05}.txt"));
        let wanted = sample.scene.relation.is_some();
        assert_eq!(caption.exists(), wanted, "sample {i}: {}", sample.caption);
        if wanted {
            kept += 1;
            // The stream's own caption, which names both shapes.
            assert_eq!(std::fs::read_to_string(caption).unwrap(), sample.caption);
        }
    }
    assert_eq!(written, kept);
    // One image in three has two shapes: about 40 of 120.
    assert!((20..60).contains(&kept), "kept {kept}");
}

/// The first sample (from seed 1) that `pick` accepts.
fn find(pick: impl Fn(&Sample) -> bool) -> Sample {
    ShapesStream::new(1).find(pick).expect("no such sample")
}

/// Asserts that `caption` is judged wrong on exactly `attribute` of `shape`.
fn assert_wrong_only_on(
    caption: &str,
    sample: &Sample,
    attribute: Attribute,
    shape: Option<usize>,
) {
    let judgement = judge(caption, sample);
    let wrong: Vec<_> = judgement.wrong().map(|v| (v.attribute, v.shape)).collect();
    assert_eq!(
        wrong,
        [(attribute, shape)],
        "{caption:?} on {:?}",
        sample.scene
    );
}

#[test]
fn checker_catches_a_wrong_color_kind_or_position() {
    let sample = find(|s| s.scene.relation.is_none());
    let full = PromptSpec::full(&sample.scene);
    let PromptSpec::One {
        size,
        shape,
        position,
        background,
    } = full
    else {
        unreachable!()
    };
    let with = |shape: ShapeSpec, position: Option<Cell>| {
        caption_for(&PromptSpec::One {
            size,
            shape,
            position,
            background,
        })
    };

    let other_color = Color::ALL
        .into_iter()
        .find(|&c| c != shape.color && c != background.unwrap())
        .unwrap();
    assert_wrong_only_on(
        &with(
            ShapeSpec {
                color: other_color,
                ..shape
            },
            position,
        ),
        &sample,
        Attribute::Color,
        Some(0),
    );

    let other_kind = Kind::ALL.into_iter().find(|&k| k != shape.kind).unwrap();
    assert_wrong_only_on(
        &with(
            ShapeSpec {
                kind: other_kind,
                ..shape
            },
            position,
        ),
        &sample,
        Attribute::Kind,
        Some(0),
    );

    // Another cell in the same row: a corner or centre phrase checks both axes, so only the
    // column is wrong; a bare `on the left`/`on the right` checks only the column.
    let cell = position.unwrap();
    let moved = Cell {
        row: cell.row,
        col: (cell.col + 1) % 3,
    };
    let caption = with(shape, Some(moved));
    let judgement = judge(&caption, &sample);
    let wrong: Vec<_> = judgement.wrong().map(|v| v.attribute).collect();
    assert_eq!(wrong, [Attribute::Column], "{caption}");
    let (row_named, _) = moved.named_axes();
    assert_eq!(
        judgement.verdict(Attribute::Row, Some(0)).is_some(),
        row_named,
        "{caption}"
    );

    // The wrong background.
    let judgement = judge(
        &caption_for(&PromptSpec::One {
            size,
            shape,
            position,
            background: Some(other_color),
        }),
        &sample,
    );
    assert_eq!(
        judgement.wrong().map(|v| v.attribute).collect::<Vec<_>>(),
        [Attribute::Background]
    );
}

#[test]
fn position_phrases_check_only_the_axes_they_name() {
    // A shape in the top-left cell satisfies `on the left` and `at the top`, not `at the bottom`.
    let sample =
        find(|s| s.scene.relation.is_none() && s.scene.shapes[0].cell == Cell { row: 0, col: 0 });
    let shape = ShapeSpec {
        color: sample.scene.shapes[0].color,
        kind: sample.scene.shapes[0].kind,
    };
    let with = |cell| {
        caption_for(&PromptSpec::One {
            size: None,
            shape,
            position: Some(cell),
            background: None,
        })
    };
    assert!(judge(&with(Cell { row: 1, col: 0 }), &sample).all_right());
    assert!(judge(&with(Cell { row: 0, col: 1 }), &sample).all_right());
    let judgement = judge(&with(Cell { row: 2, col: 1 }), &sample);
    assert_eq!(
        judgement.wrong().map(|v| v.attribute).collect::<Vec<_>>(),
        [Attribute::Row]
    );
    assert_eq!(judgement.stated(), 3);
}

#[test]
fn checker_judges_two_shapes_by_matching_then_relation() {
    let sample = find(|s| {
        s.scene.relation == Some(Relation::LeftOf)
            && (s.scene.shapes[0].color, s.scene.shapes[0].kind)
                != (s.scene.shapes[1].color, s.scene.shapes[1].kind)
    });
    let look = |k: usize| ShapeSpec {
        color: sample.scene.shapes[k].color,
        kind: sample.scene.shapes[k].kind,
    };
    let caption = |first, relation, second| {
        caption_for(&PromptSpec::Two {
            first,
            relation,
            second,
            background: Some(sample.scene.background),
        })
    };
    assert!(judge(&caption(look(0), Relation::LeftOf, look(1)), &sample).all_right());
    // Named the other way round: shapes still match, the relation is wrong.
    assert_wrong_only_on(
        &caption(look(1), Relation::LeftOf, look(0)),
        &sample,
        Attribute::Relation,
        None,
    );
    // `above` for a left-right pair: the vertical offset is at most half the horizontal one
    // (at least 12 px), so it may or may not reach 6 px; the shapes are right either way.
    let judgement = judge(&caption(look(0), Relation::Above, look(1)), &sample);
    assert!(judgement
        .wrong()
        .all(|v| v.attribute == Attribute::Relation));
    // A wrong color on the second shape.
    let bg = sample.scene.background;
    let other = Color::ALL
        .into_iter()
        .find(|&c| c != bg && c != look(0).color && c != look(1).color)
        .unwrap();
    assert_wrong_only_on(
        &caption(
            look(0),
            Relation::LeftOf,
            ShapeSpec {
                color: other,
                ..look(1)
            },
        ),
        &sample,
        Attribute::Color,
        Some(1),
    );
}

#[test]
fn missing_shapes_make_every_shape_attribute_wrong() {
    let blank = Sample {
        image: Color::Blue.rgb().repeat(64 * 64),
        ..find(|_| true)
    };
    let judgement = judge(
        "a large red circle in the top left on a blue background",
        &blank,
    );
    let wrong: Vec<_> = judgement.wrong().map(|v| v.attribute).collect();
    assert_eq!(
        wrong,
        [
            Attribute::Color,
            Attribute::Kind,
            Attribute::Size,
            Attribute::Row,
            Attribute::Column
        ]
    );
    assert!(
        judgement
            .verdict(Attribute::Background, None)
            .unwrap()
            .right
    );

    // A two-shape caption on a one-shape image.
    let one = find(|s| s.scene.relation.is_none());
    let judgement = judge("a red circle above a blue square", &one);
    assert_eq!(judgement.stated(), 5);
    assert_eq!(judgement.right(), 0);
}

#[test]
fn captions_outside_the_grammar_are_errors() {
    let sample = find(|_| true);
    for bad in [
        "a red circle to the right of a blue square",
        "an red circle",
        "a circle",
        "two red circles",
    ] {
        let err = check(bad, &sample.image, 64, 64)
            .expect_err(bad)
            .to_string();
        assert!(err.contains("outside the shapes grammar"), "{err}");
    }
}
