//! diffusers' `TextualInversionLoaderMixin.load_textual_inversion` on the Stable Diffusion and
//! SDXL components. The prompt encoders rewrite multi-vector tokens
//! ([`diffusion_loaders::textual_inversion::maybe_convert_prompt`]), so a prompt naming the token
//! just works.

use std::path::Path;

use diffusion_core::Result;
use diffusion_loaders::textual_inversion::{self, TextualInversion};

use crate::{StableDiffusionComponents, StableDiffusionXLComponents};

impl StableDiffusionComponents {
    /// Load a textual-inversion embedding (a file, or a folder with `learned_embeds.safetensors`)
    /// into `tokenizer` and `text_encoder`. `token` overrides the file's own token (for A1111
    /// files without one, the file name is used). Returns the tokens added: `token`, then
    /// `token_1 ...` for a multi-vector embedding.
    ///
    /// ```no_run
    /// use diffusion_pipelines::StableDiffusionComponents;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let device = diffusion_core::Device::default();
    /// let mut sd = StableDiffusionComponents::from_pretrained("stable-diffusion-v1-5", &device)?;
    /// sd.load_textual_inversion("cat-toy/learned_embeds.safetensors", Some("<cat-toy>"))?;
    /// // "a photo of <cat-toy>" now uses the learned vectors.
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`diffusion_core::Error::TokenInVocabulary`] when the token is
    /// already a word, [`diffusion_core::Error::EmbeddingDim`] when the
    /// vectors do not fit the text encoder, and
    /// [`diffusion_core::Error::UnknownEmbeddingLayout`] for an unknown file (an
    /// SDXL two-table file included); nothing is changed then.
    pub fn load_textual_inversion(
        &mut self,
        path: impl AsRef<Path>,
        token: Option<&str>,
    ) -> Result<Vec<String>> {
        let file = TextualInversion::open(path)?;
        let token = file.token_or(token);
        let vectors = file.single_table()?;
        textual_inversion::load_into(
            &mut self.tokenizer,
            &mut self.text_encoder.text_model,
            &token,
            vectors,
            file.path(),
        )
    }

    /// Remove textual-inversion tokens (diffusers' `unload_textual_inversion`): `tokens`, or
    /// every token added to the tokenizer when `None`; the text encoder's embedding shrinks to
    /// match and the tokens that stay keep their vectors. Multi-vector embeddings are several
    /// tokens (`<tok>`, `<tok>_1`, ...): name them all, or pass `None`.
    ///
    /// ```no_run
    /// use diffusion_pipelines::StableDiffusionComponents;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let device = diffusion_core::Device::default();
    /// let mut sd = StableDiffusionComponents::from_pretrained("stable-diffusion-v1-5", &device)?;
    /// sd.load_textual_inversion("cat-toy.safetensors", Some("<cat-toy>"))?;
    /// sd.unload_textual_inversion(Some(&["<cat-toy>"]))?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`diffusion_core::Error::InvalidArgument`] (`tokens`) when none of `tokens` was added;
    /// nothing changes then.
    pub fn unload_textual_inversion(&mut self, tokens: Option<&[&str]>) -> Result<Vec<u32>> {
        textual_inversion::unload_from(
            &mut self.tokenizer,
            &mut self.text_encoder.text_model,
            tokens,
        )
    }
}

impl StableDiffusionXLComponents {
    /// Load an SDXL textual-inversion file: its `clip_l` table into `text_encoder` /
    /// `tokenizer` and its `clip_g` table into `text_encoder_2` / `tokenizer_2`, under the same
    /// token (`token`, else the file name). Without a first encoder (refiners) only `clip_g` is
    /// loaded. Returns the tokens added to each tokenizer.
    ///
    /// ```no_run
    /// use diffusion_pipelines::StableDiffusionXLComponents;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let device = diffusion_core::Device::default();
    /// let mut sdxl = StableDiffusionXLComponents::from_pretrained("sdxl-base", &device)?;
    /// sdxl.load_textual_inversion("embeddings/style.safetensors", Some("<style>"))?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`StableDiffusionComponents::load_textual_inversion`]; a file without both tables is
    /// [`diffusion_core::Error::UnknownEmbeddingLayout`]. Both pairs are checked
    /// before either is changed.
    pub fn load_textual_inversion(
        &mut self,
        path: impl AsRef<Path>,
        token: Option<&str>,
    ) -> Result<Vec<String>> {
        let file = TextualInversion::open(path)?;
        let token = file.token_or(token);
        let (clip_l, clip_g) = file.sdxl_tables()?;
        if let (Some(tokenizer), Some(encoder)) = (&self.tokenizer, &self.text_encoder) {
            textual_inversion::check(tokenizer, &encoder.text_model, &token, clip_l, file.path())?;
        }
        textual_inversion::check(
            &self.tokenizer_2,
            &self.text_encoder_2.text_model,
            &token,
            clip_g,
            file.path(),
        )?;
        if let (Some(tokenizer), Some(encoder)) = (&mut self.tokenizer, &mut self.text_encoder) {
            textual_inversion::load_into(
                tokenizer,
                &mut encoder.text_model,
                &token,
                clip_l,
                file.path(),
            )?;
        }
        textual_inversion::load_into(
            &mut self.tokenizer_2,
            &mut self.text_encoder_2.text_model,
            &token,
            clip_g,
            file.path(),
        )
    }

    /// Remove textual-inversion tokens from both tokenizer / encoder pairs (diffusers'
    /// `unload_textual_inversion`, called for each pair): `tokens`, or every added token when
    /// `None`. Returns the ids removed from `tokenizer_2`.
    ///
    /// # Errors
    /// [`diffusion_core::Error::InvalidArgument`] (`tokens`) when none of `tokens` was added
    /// to `tokenizer_2`; nothing changes then.
    pub fn unload_textual_inversion(&mut self, tokens: Option<&[&str]>) -> Result<Vec<u32>> {
        let mut tokenizer_2 = self.tokenizer_2.clone();
        let mut encoder_2 = self.text_encoder_2.text_model.clone();
        let removed = textual_inversion::unload_from(&mut tokenizer_2, &mut encoder_2, tokens)?;
        if let (Some(tokenizer), Some(encoder)) = (&mut self.tokenizer, &mut self.text_encoder) {
            let mut t = tokenizer.clone();
            let mut e = encoder.text_model.clone();
            // The first pair may lack tokens the second has (a file loaded before the first
            // encoder existed); only a real failure stops the unload.
            match textual_inversion::unload_from(&mut t, &mut e, tokens) {
                Ok(_) => {
                    *tokenizer = t;
                    encoder.text_model = e;
                }
                Err(diffusion_core::Error::InvalidArgument { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        self.tokenizer_2 = tokenizer_2;
        self.text_encoder_2.text_model = encoder_2;
        Ok(removed)
    }
}
