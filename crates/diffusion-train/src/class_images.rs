//! Class images for DreamBooth's prior preservation, made as train_dreambooth.py and
//! train_dreambooth_lora.py make them before training: when the class folder holds fewer
//! entries than `num_class_images`, the Stable Diffusion pipeline of the model about to be
//! trained draws the missing ones from the class prompt, `sample_batch_size` prompts per call.
//!
//! The scripts call the pipeline without a generator; here image `i` (counted over the whole
//! folder, existing entries first) uses its own generator seeded from the run's seed and `i`,
//! so the images do not depend on the batch size and a rerun makes the same files. Each file is
//! named as the scripts name it, `{i}-{sha1 of the RGB bytes}`, but written as PNG (the scripts
//! write JPEG, which would add compression noise to what the model learns as the prior).

use std::path::{Path, PathBuf};

use diffusion_core::image::{ImageOutput, OutputType, save_png};
use diffusion_core::{Device, Error, Result};
use diffusion_pipelines::{Generators, StableDiffusionArgs, StableDiffusionPipeline};

use crate::dreambooth::DreamBoothConfig;
use crate::run::derived_seed;

/// Seed domain of class-image generators (0: steps, 1: epochs, 2: cached latents).
const CLASS_IMAGE_DOMAIN: u64 = 3;

/// Fill `config.class_data_dir` up to `config.num_class_images` entries with images of
/// `config.class_prompt` from the pipeline in `config.train.pretrained_model` (creating the
/// folder when missing; entries already there are kept and counted, as the scripts count
/// every entry of the folder). Does nothing without prior preservation. Returns the new files.
///
/// # Errors
/// [`Error::InvalidArgument`] (`class_data_dir`, `class_prompt`) when prior preservation lacks
/// them or the model path is not UTF-8; pipeline loading and generation errors; [`Error::Io`].
pub fn generate_class_images(config: &DreamBoothConfig, device: &Device) -> Result<Vec<PathBuf>> {
    if !config.with_prior_preservation {
        return Ok(Vec::new());
    }
    let dir = config
        .class_data_dir
        .as_deref()
        .ok_or_else(|| Error::invalid_argument("class_data_dir", "prior preservation needs one"))?;
    let prompt = config
        .class_prompt
        .as_deref()
        .ok_or_else(|| Error::invalid_argument("class_prompt", "prior preservation needs one"))?;
    if config.sample_batch_size == 0 {
        return Err(Error::invalid_argument(
            "sample_batch_size",
            "must be positive",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let existing = count_entries(dir)?;
    if existing >= config.num_class_images {
        return Ok(Vec::new());
    }
    let model = &config.train.pretrained_model;
    let model = model.to_str().ok_or_else(|| {
        Error::invalid_argument(
            "pretrained_model",
            format!("{} is not valid UTF-8", model.display()),
        )
    })?;
    let mut pipe =
        StableDiffusionPipeline::from_pretrained(model, &device.clone().without_autodiff())?;
    log::info!(
        "generating {} class images into {}",
        config.num_class_images - existing,
        dir.display()
    );
    let mut written = Vec::new();
    let indices: Vec<usize> = (existing..config.num_class_images).collect();
    for batch in indices.chunks(config.sample_batch_size) {
        let seeds = batch
            .iter()
            .map(|&i| derived_seed(config.train.seed, CLASS_IMAGE_DOMAIN, i as u64))
            .collect();
        let out = pipe.call(StableDiffusionArgs {
            prompt: vec![prompt.to_string(); batch.len()],
            num_inference_steps: config.class_num_inference_steps,
            generator: Generators::Seeds(seeds),
            output_type: OutputType::Pil,
            progress: false,
            ..Default::default()
        })?;
        let ImageOutput::Images(images) = out.images else {
            return Err(Error::invalid_argument(
                "output_type",
                "the pipeline returned no images",
            ));
        };
        for (&i, image) in batch.iter().zip(&images) {
            let path = dir.join(format!("{i}-{}.png", sha1_hex(image.as_raw())));
            save_png(&path, image, &[])?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Entries of a folder, as `len(list(Path(dir).iterdir()))`.
fn count_entries(dir: &Path) -> Result<usize> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut n = 0;
    for entry in entries {
        entry.map_err(|e| Error::io(dir, e))?;
        n += 1;
    }
    Ok(n)
}

/// SHA-1 (FIPS 180-4) of `data` as lowercase hex: the scripts' `hashlib.sha1(image.tobytes())`.
pub fn sha1_hex(data: &[u8]) -> String {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xefcd_ab89,
        0x98ba_dcfe,
        0x1032_5476,
        0xc3d2_e1f0,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, &wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5a82_7999),
                20..=39 => (b ^ c ^ d, 0x6ed9_eba1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::sha1_hex;

    #[test]
    fn sha1_matches_known_digests() {
        assert_eq!(sha1_hex(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(sha1_hex(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(sha1_hex(long), "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
        // Several blocks (hashlib.sha1(bytes(range(256)) * 5)).
        let bytes: Vec<u8> = (0..5).flat_map(|_| 0..=255u8).collect();
        assert_eq!(sha1_hex(&bytes), "e37a04cb2353309f5cff4ee036cfb91a5e31cefd");
    }
}
