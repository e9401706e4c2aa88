//! `CLIPImageProcessor` against transformers (PIL backend): pixel values within 1e-4 and
//! Pillow's bicubic resize bit for bit.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{RgbImage, load_image};
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::WeightSource;
use diffusion_models::image_encoders::pil::{self, PILResampling};
use diffusion_models::image_encoders::{CLIPImageProcessor, ImageSize};

use crate::{assert_close, device, fixture, io_tensor};

const IMAGES: [&str; 3] = ["gradient_64x48", "noise_37x53", "noise_20x27"];

fn image(name: &str) -> Result<RgbImage> {
    Ok(load_image(
        fixture("image_processor").join(format!("{name}.png")),
    )?)
}

fn io() -> Result<WeightSource> {
    Ok(WeightSource::open(
        fixture("image_processor").join("io.safetensors"),
    )?)
}

#[test]
fn pil_bicubic_resize_is_bit_exact() -> Result<()> {
    let io = io()?;
    for name in IMAGES {
        let img = image(name)?;
        let want = io_tensor::<3>(&io, &format!("{name}/resized"))?;
        let [h, w, _] = want.dims();
        let got = pil::resize(&img, w, h, PILResampling::Bicubic)?;
        let got: Vec<f32> = got.as_raw().iter().map(|&v| f32::from(v)).collect();
        let want = to_vec(want);
        let differing = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(
            differing,
            0,
            "{name}: {differing} of {} levels differ",
            want.len()
        );
    }
    Ok(())
}

#[test]
fn pixel_values_match_transformers() -> Result<()> {
    let io = io()?;
    let processor = CLIPImageProcessor::from_pretrained(fixture("image_processor"))?;
    assert_eq!(processor.size, ImageSize::ShortestEdge(32));
    let pad = CLIPImageProcessor::from_pretrained(fixture("image_processor/pad"))?;
    assert_eq!(pad.crop_size, (28, 40));
    for name in IMAGES {
        let img = image(name)?;
        let got = processor.preprocess(std::slice::from_ref(&img), &device())?;
        assert_close(
            &format!("{name} pixel_values"),
            got,
            io_tensor(&io, &format!("{name}/pixel_values"))?,
        );
        let got = pad.preprocess(&[img], &device())?;
        assert_close(
            &format!("{name} padded pixel_values"),
            got,
            io_tensor(&io, &format!("{name}/pad/pixel_values"))?,
        );
    }
    Ok(())
}

#[test]
fn batches_stack_and_bad_inputs_are_errors() -> Result<()> {
    let io = io()?;
    let processor = CLIPImageProcessor::from_pretrained(fixture("image_processor"))?;
    let images = IMAGES.map(|n| image(n).expect("fixture image"));
    let batch = processor.preprocess(&images, &device())?;
    assert_eq!(batch.dims(), [3, 3, 32, 32]);
    let want = Tensor::cat(
        IMAGES
            .iter()
            .map(|n| io_tensor::<4>(&io, &format!("{n}/pixel_values")))
            .collect::<Result<Vec<_>>>()?,
        0,
    );
    assert_close("batch", batch, want);

    assert!(matches!(
        processor.preprocess(&[], &device()),
        Err(Error::InvalidArgument { .. })
    ));
    let empty = RgbImage::new(0, 0);
    assert!(matches!(
        processor.preprocess(&[empty], &device()),
        Err(Error::InvalidArgument { .. })
    ));
    let uncropped = CLIPImageProcessor {
        do_center_crop: false,
        ..processor
    };
    assert!(matches!(
        uncropped.preprocess(&images, &device()),
        Err(Error::InvalidArgument { .. })
    ));
    let missing = tempfile::tempdir()?;
    assert!(matches!(
        CLIPImageProcessor::from_pretrained(missing.path()),
        Err(Error::NotFound { .. })
    ));
    Ok(())
}
