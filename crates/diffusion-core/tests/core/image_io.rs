//! Image loading errors, PNG metadata, the VaeImageProcessor round trip, `.npy` files.

use diffusion_core::image::{
    ImageOutput, OutputType, RgbImage, VaeImageProcessor, load_image, make_image_grid,
    padded_image_grid, read_png_text, save_png,
};
use diffusion_core::npy::NpyArray;
use diffusion_core::{Device, Error};

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x + y) * 3) as u8])
    })
}

#[test]
fn a_non_image_file_is_a_typed_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not_an_image.png");
    std::fs::write(&path, b"this is text, not a PNG").unwrap();
    match load_image(&path).unwrap_err() {
        Error::Image { path: p, .. } => assert_eq!(p, path),
        other => panic!("expected Error::Image, got {other:?}"),
    }
    // A PNG signature followed by garbage is caught by the decoder.
    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    assert!(matches!(
        load_image(&truncated).unwrap_err(),
        Error::Image { .. }
    ));
    assert!(matches!(
        load_image(dir.path().join("absent.png")).unwrap_err(),
        Error::Io { .. }
    ));
}

#[test]
fn png_round_trip_keeps_pixels_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    let img = gradient(13, 9);
    let text = vec![
        (
            "parameters".to_string(),
            "a cat\nSteps: 20, Seed: 42".to_string(),
        ),
        ("prompt".to_string(), "un chat — 猫".to_string()),
    ];
    save_png(&path, &img, &text).unwrap();
    assert_eq!(load_image(&path).unwrap(), img);
    assert_eq!(read_png_text(&path).unwrap(), text);
}

#[test]
fn processor_round_trip_and_rounding() {
    let device = Device::default();
    let p = VaeImageProcessor::default();
    let img = gradient(16, 24);
    let t = p
        .preprocess(std::slice::from_ref(&img), None, None, &device)
        .unwrap();
    assert_eq!(t.dims(), [1, 3, 24, 16]);
    let v = diffusion_core::tensor::to_vec(t.clone());
    assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    match p.postprocess(t.clone(), OutputType::Pil) {
        ImageOutput::Images(imgs) => assert_eq!(imgs[0], img),
        _ => panic!("expected images"),
    }
    match p.postprocess(t, OutputType::Np) {
        ImageOutput::Array(a) => assert_eq!(a.shape, vec![1, 24, 16, 3]),
        _ => panic!("expected array"),
    }
    // Sizes are rounded down to the VAE factor; too small is an error.
    assert_eq!(
        p.default_height_width(&gradient(21, 30), None, None),
        (24, 16)
    );
    assert!(
        p.preprocess(&[gradient(5, 5)], None, None, &device)
            .is_err()
    );
}

#[test]
fn grid_and_npy_files() {
    let imgs = vec![gradient(4, 4); 6];
    let grid = make_image_grid(&imgs, 2, 3).unwrap();
    assert_eq!(grid.dimensions(), (12, 8));
    assert!(make_image_grid(&imgs, 4, 4).is_err());
    // Five tiles: near-square 3 columns, the sixth tile black; a lone image comes back as is.
    let padded = padded_image_grid(&imgs[..5], None).unwrap();
    assert_eq!(padded.dimensions(), (12, 8));
    assert_eq!(padded.get_pixel(11, 7).0, [0, 0, 0]);
    assert_eq!(padded_image_grid(&imgs[..1], None).unwrap(), imgs[0]);
    assert!(padded_image_grid(&[], None).is_err());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latents.npy");
    let a = NpyArray {
        shape: vec![1, 4, 2, 2],
        data: (0..16).map(|i| i as f32).collect(),
    };
    a.write(&path).unwrap();
    assert_eq!(NpyArray::read(&path).unwrap(), a);
    std::fs::write(&path, b"\x93NUMPY\x01\x00garbage").unwrap();
    assert!(matches!(
        NpyArray::read(&path).unwrap_err(),
        Error::Npy { .. }
    ));
}
