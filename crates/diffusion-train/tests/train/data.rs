//! Data loading: the digits loader against the oracle's batch, the resampler against PIL, and the
//! image-folder loader on generated files.

use diffusion_core::weights::WeightSource;
use diffusion_train::resize::resize_bilinear;
use diffusion_train::{FolderOptions, ImageDataset};

use crate::{fixtures, max_abs_diff};

#[test]
fn digits_loader_gives_the_oracle_batch() {
    let ds = ImageDataset::from_digits_csv_gz(fixtures().join("digits_head.csv.gz"), 8).unwrap();
    assert_eq!(ds.dims(), [16, 1, 8, 8]);
    assert_eq!(&ds.labels().unwrap()[..6], &[0, 1, 2, 3, 4, 5]);
    let source = WeightSource::open(fixtures().join("steps.safetensors")).unwrap();
    let (x0, shape) = source.read_f32("x0").unwrap();
    assert_eq!(shape, [4, 1, 8, 8]);
    assert_eq!(ds.batch(&[0, 1, 2, 3], &[]).unwrap(), x0);
    assert!(x0.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(x0.contains(&-1.0) && x0.contains(&1.0));

    // Plain text where gzip is expected is an I/O error naming the file.
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("digits.csv.gz");
    std::fs::write(&plain, "0,1,2\n").unwrap();
    match ImageDataset::from_digits_csv_gz(&plain, 8) {
        Err(diffusion_core::Error::Io { path, .. }) => assert_eq!(path, plain),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn digits_upscaling_matches_pil_bilinear() {
    let source = WeightSource::open(fixtures().join("steps.safetensors")).unwrap();
    let (reference, _) = source.read_f32("resize/digit0_16x16").unwrap();
    let ds = ImageDataset::from_digits_csv_gz(fixtures().join("digits_head.csv.gz"), 16).unwrap();
    assert_eq!(ds.dims(), [16, 1, 16, 16]);
    let normalised: Vec<f32> = reference.iter().map(|v| (v - 0.5) / 0.5).collect();
    assert_eq!(max_abs_diff(ds.image(0), &normalised), 0.0);
}

#[test]
fn resampler_matches_pil_up_down_and_mixed() {
    let source = WeightSource::open(fixtures().join("steps.safetensors")).unwrap();
    for (src, key, w, h) in [
        ("resize/digit0_src", "resize/digit0_12x12", 12, 12),
        ("resize/odd_src", "resize/odd_7x5", 7, 5),
        ("resize/odd_src", "resize/odd_30x9", 30, 9),
    ] {
        let (plane, shape) = source.read_f32(src).unwrap();
        let (reference, ref_shape) = source.read_f32(key).unwrap();
        assert_eq!(ref_shape, [h, w]);
        let ours = resize_bilinear(&plane, shape[1], shape[0], w, h);
        let diff = max_abs_diff(&ours, &reference);
        assert!(diff <= 1e-6, "{key}: differs from PIL by {diff}");
    }
}

#[test]
fn image_folder_resizes_crops_and_normalises() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("class_a");
    std::fs::create_dir(&nested).unwrap();
    // 40x20: the short side becomes 8, the long one 16, and the center crop keeps x in 4..12.
    // Left half black, right half white: after the crop the left half is -1, the right +1.
    let img = image::RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            image::Rgb([0, 0, 0])
        } else {
            image::Rgb([255, 255, 255])
        }
    });
    img.save(nested.join("halves.png")).unwrap();
    let flat = image::RgbImage::from_pixel(9, 9, image::Rgb([255, 0, 51]));
    flat.save(dir.path().join("flat.jpg")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();

    let ds = ImageDataset::from_image_folder(dir.path(), &FolderOptions::new(8)).unwrap();
    assert_eq!(ds.dims(), [2, 3, 8, 8]);
    // Sorted paths: class_a/halves.png before flat.jpg.
    let halves = ds.image(0);
    for c in 0..3 {
        for y in 0..8 {
            let row = &halves[(c * 8 + y) * 8..(c * 8 + y) * 8 + 8];
            assert!(row[..3].iter().all(|&v| v == -1.0), "{row:?}");
            assert!(row[5..].iter().all(|&v| v == 1.0), "{row:?}");
        }
    }
    // JPEG keeps a flat color close to exact; red stays the largest channel.
    let flat = ds.image(1);
    let mean = |c: usize| flat[c * 64..(c + 1) * 64].iter().sum::<f32>() / 64.0;
    assert!(mean(0) > 0.9 && mean(1) < -0.9 && (mean(2) - (51.0 / 255.0 * 2.0 - 1.0)).abs() < 0.05);

    let gray = ImageDataset::from_image_folder(
        dir.path(),
        &FolderOptions {
            resolution: 4,
            grayscale: true,
        },
    )
    .unwrap();
    assert_eq!(gray.dims(), [2, 1, 4, 4]);

    let empty = tempfile::tempdir().unwrap();
    assert!(ImageDataset::from_image_folder(empty.path(), &FolderOptions::new(8)).is_err());
    std::fs::write(empty.path().join("broken.png"), b"not a png").unwrap();
    let err = ImageDataset::from_image_folder(empty.path(), &FolderOptions::new(8)).unwrap_err();
    assert!(err.to_string().contains("broken.png"), "{err}");
}
