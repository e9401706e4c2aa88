//! transformers' `XLMRobertaTokenizer` (AltDiffusion's tokenizer) on the `tokenizers` crate:
//! a sentencepiece Unigram model with `▁` word markers, `<s> ... </s>` around each prompt, and the
//! `padding="max_length", truncation=True` call diffusers' AltDiffusion pipelines make.
//!
//! A folder is read from its `tokenizer.json` (what transformers' `save_pretrained` writes for an
//! `XLMRobertaTokenizer` since transformers 5, and what the fast tokenizer always wrote);
//! `tokenizer_config.json` (then `special_tokens_map.json`) supplies `model_max_length` and the
//! special tokens. XLM-R's layout is `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `<mask>` last.

use std::path::Path;

use diffusion_core::{Error, Result};

use super::tokenizer::{
    NO_LIMIT, Padding, SpecialTokenIds, TokenizerOutput, field_error, read_special_tokens,
};

/// The special tokens and limits of an XLM-R tokenizer folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XLMRobertaTokenizerConfig {
    /// `model_max_length` (77 in AltDiffusion folders; no limit when the folder names none).
    pub model_max_length: usize,
    /// `bos_token` (`<s>`), put before every prompt.
    pub bos_token: String,
    /// `eos_token` (`</s>`), put after every prompt.
    pub eos_token: String,
    /// `unk_token` (`<unk>`).
    pub unk_token: String,
    /// `pad_token` (`<pad>`).
    pub pad_token: String,
}

impl Default for XLMRobertaTokenizerConfig {
    /// `XLMRobertaTokenizer.__init__` defaults (transformers
    /// `models/xlm_roberta/tokenization_xlm_roberta.py`).
    fn default() -> Self {
        Self {
            model_max_length: NO_LIMIT,
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            unk_token: "<unk>".into(),
            pad_token: "<pad>".into(),
        }
    }
}

impl XLMRobertaTokenizerConfig {
    /// Read `special_tokens_map.json` and `tokenizer_config.json` of `dir` (both optional; the
    /// config wins where both name a token). Missing entries keep [`Default`] values.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for unreadable files, [`Error::ConfigField`] naming the
    /// file and key for a token or `model_max_length` of the wrong type.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut config = Self::default();
        read_special_tokens(
            dir,
            &mut [
                ("bos_token", &mut config.bos_token),
                ("eos_token", &mut config.eos_token),
                ("unk_token", &mut config.unk_token),
                ("pad_token", &mut config.pad_token),
            ],
            &mut config.model_max_length,
            1,
        )?;
        Ok(config)
    }
}

/// transformers' `XLMRobertaTokenizer`.
///
/// ```
/// # fn main() -> diffusion_core::Result<()> {
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/alt_diffusion/alt/tokenizer");
/// use diffusion_models::{Padding, XLMRobertaTokenizer};
///
/// let tokenizer = XLMRobertaTokenizer::from_pretrained(dir)?;
/// let out = tokenizer.tokenize(&["幻想风景"], Padding::MaxLength, Some(77), true)?;
/// assert_eq!(out.input_ids[0].len(), 77);
/// assert_eq!(out.input_ids[0][0], tokenizer.bos_token_id());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct XLMRobertaTokenizer {
    tokenizer: tokenizers::Tokenizer,
    config: XLMRobertaTokenizerConfig,
    ids: SpecialTokenIds,
}

impl XLMRobertaTokenizer {
    /// Load a tokenizer folder: `tokenizer.json` with `tokenizer_config.json` /
    /// `special_tokens_map.json`.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the folder when it has no `tokenizer.json` (a folder with only
    /// the sentencepiece model `sentencepiece.bpe.model` must be converted first, e.g. by saving
    /// it once with transformers' `XLMRobertaTokenizerFast`); [`Error::ConfigField`] naming the
    /// file for a tokenizer that cannot be parsed or a special token missing from the
    /// vocabulary; I/O and JSON errors naming the file.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = XLMRobertaTokenizerConfig::from_dir(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            let message = if dir.join("sentencepiece.bpe.model").is_file() {
                "no `tokenizer.json`: only `sentencepiece.bpe.model`, which this port does not \
                 read; save the tokenizer once with transformers' XLMRobertaTokenizerFast"
            } else {
                "no `tokenizer.json` in the tokenizer folder"
            };
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                message: message.into(),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_json)
            .map_err(|e| field_error(&tokenizer_json, "model", e.to_string()))?;
        Self::new(tokenizer, config, &tokenizer_json)
    }

    /// Wrap a `tokenizers` tokenizer (its own post-processor is not used: bos and eos are added
    /// here, as XLM-R's template does for one sequence).
    ///
    /// # Errors
    /// [`Error::ConfigField`] naming `origin` for a special token missing from the vocabulary.
    pub fn new(
        tokenizer: tokenizers::Tokenizer,
        config: XLMRobertaTokenizerConfig,
        origin: &Path,
    ) -> Result<Self> {
        Ok(Self {
            ids: SpecialTokenIds::resolve(
                &tokenizer,
                origin,
                [&config.bos_token, &config.eos_token, &config.pad_token],
            )?,
            tokenizer,
            config,
        })
    }

    /// The folder's special tokens and `model_max_length`.
    pub fn config(&self) -> &XLMRobertaTokenizerConfig {
        &self.config
    }

    /// `model_max_length` (77 for AltDiffusion).
    pub fn model_max_length(&self) -> usize {
        self.config.model_max_length
    }

    /// `bos_token_id` (`<s>`, 0).
    pub fn bos_token_id(&self) -> u32 {
        self.ids.bos
    }

    /// `eos_token_id` (`</s>`, 2).
    pub fn eos_token_id(&self) -> u32 {
        self.ids.eos
    }

    /// `pad_token_id` (`<pad>`, 1).
    pub fn pad_token_id(&self) -> u32 {
        self.ids.pad
    }

    /// The vocabulary size including added tokens (`len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The id of `token`, `None` when it has none.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// transformers' `tokenize(prompt)`: the sentencepiece pieces of one prompt, without
    /// special tokens.
    ///
    /// # Errors
    /// As [`Self::encode`].
    pub fn tokens(&self, prompt: &str) -> Result<Vec<String>> {
        self.tokenizer
            .encode(prompt, false)
            .map(|e| e.get_tokens().to_vec())
            .map_err(|e| Error::invalid_argument("prompt", e.to_string()))
    }

    /// The ids of one prompt without truncation or padding (`tokenizer(prompt).input_ids`),
    /// with `<s>` / `</s>` when `add_special_tokens`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`prompt`) when the tokenizer rejects the text.
    pub fn encode(&self, prompt: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let text = self
            .tokenizer
            .encode(prompt, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::invalid_argument("prompt", e.to_string()))?;
        Ok(if add_special_tokens {
            self.ids.wrap(text)
        } else {
            text
        })
    }

    /// `tokenizer(prompts, padding=padding, max_length=max_length, truncation=truncation)`:
    /// `<s>` + text ids + `</s>` per prompt; with truncation the text is cut so a row is at most
    /// `max_length` (default `model_max_length`) ids and still ends with `</s>`; padding appends
    /// `pad_token_id` with mask 0. diffusers' AltDiffusion pipelines call it with
    /// `(Padding::MaxLength, Some(77), true)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`max_length`) for a length below 2 with truncation, or for
    /// [`Padding::MaxLength`] without a finite length; as [`Self::encode`].
    pub fn tokenize<S: AsRef<str>>(
        &self,
        prompts: &[S],
        padding: Padding,
        max_length: Option<usize>,
        truncation: bool,
    ) -> Result<TokenizerOutput> {
        let max_length = max_length.unwrap_or(self.config.model_max_length);
        self.ids.tokenize(
            prompts,
            |prompt| self.encode(prompt, false),
            padding,
            max_length,
            truncation,
        )
    }
}
