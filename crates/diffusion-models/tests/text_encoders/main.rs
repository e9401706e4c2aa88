//! The CLIP tokenizer and text encoders against transformers
//! (`fixtures/oracle/gen_text_encoders.py`): token ids, encoder outputs, hidden states for
//! `clip_skip`, and the errors around loading and inputs. One test binary with modules, because
//! linking burn is slow.

mod alt_diffusion;
mod clip;
mod tokenizer;

use std::path::{Path, PathBuf};

use diffusion_core::Device;

/// `fixtures/text_encoders/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/text_encoders")
        .join(name)
}

pub fn device() -> Device {
    Device::flex()
}
