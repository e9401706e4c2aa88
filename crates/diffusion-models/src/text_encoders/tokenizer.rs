//! transformers' `CLIPTokenizer` on the `tokenizers` crate: byte-level BPE with a `</w>`
//! end-of-word suffix, CLIP's split regex, NFC + whitespace collapse + lowercase, and the
//! `padding="max_length", truncation=True` call diffusers' pipelines make.
//!
//! A folder is read from its `tokenizer.json` when it has one, otherwise built from
//! `vocab.json` + `merges.txt` exactly as transformers converts CLIP (so both give the same ids).
//! `tokenizer_config.json` (then `special_tokens_map.json`) supplies `model_max_length` and the
//! special tokens: Stable Diffusion 1.x pads with `<|endoftext|>`, OpenCLIP-based encoders
//! (SD 2.x, SDXL's second tokenizer) with `!` (id 0).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use diffusion_core::burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::{Device, Error, Result};
use serde_json::{Value, json};

/// transformers' CLIP pre-tokenisation pattern (`tokenization_clip.py`, as written into the
/// `tokenizer.json` it converts).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `CLIPTokenizer.__init__` defaults.
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_UNK: &str = "<|endoftext|>";
const DEFAULT_PAD: &str = "<|endoftext|>";

/// transformers' `VERY_LARGE_INTEGER`-style values (`1e30`) mean "no limit".
pub(crate) const NO_LIMIT: usize = usize::MAX;

/// How prompts are padded (transformers' `padding=` argument).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Padding {
    /// `padding=False`: every row keeps its own length.
    #[default]
    DoNotPad,
    /// `padding="longest"`: pad to the longest row of the batch.
    Longest,
    /// `padding="max_length"`: pad to `max_length` (or `model_max_length`).
    MaxLength,
}

/// The special tokens and limits of a tokenizer folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CLIPTokenizerConfig {
    /// `model_max_length` (77 for every CLIP checkpoint).
    pub model_max_length: usize,
    /// `bos_token`.
    pub bos_token: String,
    /// `eos_token`.
    pub eos_token: String,
    /// `unk_token`.
    pub unk_token: String,
    /// `pad_token`.
    pub pad_token: String,
}

impl Default for CLIPTokenizerConfig {
    /// transformers' `CLIPTokenizer` defaults with CLIP's 77 positions.
    fn default() -> Self {
        Self {
            model_max_length: 77,
            bos_token: DEFAULT_BOS.into(),
            eos_token: DEFAULT_EOS.into(),
            unk_token: DEFAULT_UNK.into(),
            pad_token: DEFAULT_PAD.into(),
        }
    }
}

impl CLIPTokenizerConfig {
    /// Read `tokenizer_config.json` and `special_tokens_map.json` of `dir` (both optional; the
    /// config wins where both name a token). Missing entries keep [`Default`] values.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for unreadable files, [`Error::ConfigField`] for a token
    /// or `model_max_length` of the wrong type.
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
            0,
        )?;
        Ok(config)
    }
}

/// Token ids and attention masks of a batch of prompts (`BatchEncoding`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizerOutput {
    /// One row of ids per prompt.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for a real token, 0 for padding, aligned with `input_ids`.
    pub attention_mask: Vec<Vec<u32>>,
}

impl TokenizerOutput {
    /// The ids as an integer tensor (`return_tensors="pt"`).
    ///
    /// # Shapes
    /// - output: `[batch, sequence]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`input_ids`) when the batch is empty or rows differ in length
    /// (tokenise with padding).
    pub fn input_ids_tensor(&self, device: &Device) -> Result<Tensor<2, Int>> {
        rows_to_tensor(&self.input_ids, "input_ids", device)
    }

    /// The attention mask as an integer tensor.
    ///
    /// # Shapes
    /// - output: `[batch, sequence]`
    ///
    /// # Errors
    /// As [`Self::input_ids_tensor`].
    pub fn attention_mask_tensor(&self, device: &Device) -> Result<Tensor<2, Int>> {
        rows_to_tensor(&self.attention_mask, "attention_mask", device)
    }
}

fn rows_to_tensor(rows: &[Vec<u32>], name: &str, device: &Device) -> Result<Tensor<2, Int>> {
    let len = rows.first().map(Vec::len).unwrap_or(0);
    if rows.is_empty() || rows.iter().any(|r| r.len() != len) {
        return Err(Error::invalid_argument(
            name,
            "rows must be non-empty and of equal length (tokenise with padding)",
        ));
    }
    let data: Vec<i64> = rows.iter().flatten().map(|&v| i64::from(v)).collect();
    Ok(Tensor::<2, Int>::from_data(
        TensorData::new(data, [rows.len(), len]),
        device,
    ))
}

/// transformers' `CLIPTokenizer`.
#[derive(Clone, Debug)]
pub struct CLIPTokenizer {
    tokenizer: tokenizers::Tokenizer,
    config: CLIPTokenizerConfig,
    ids: SpecialTokenIds,
}

impl CLIPTokenizer {
    /// Load a tokenizer folder (`tokenizer.json`, or `vocab.json` + `merges.txt`, with
    /// `tokenizer_config.json` / `special_tokens_map.json`).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the folder has neither `tokenizer.json` nor both vocabulary
    /// files; [`Error::ConfigField`] naming the file for a tokenizer that cannot be parsed or a
    /// special token missing from the vocabulary; I/O and JSON errors naming the file.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = CLIPTokenizerConfig::from_dir(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        if tokenizer_json.is_file() {
            let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_json)
                .map_err(|e| field_error(&tokenizer_json, "model", e.to_string()))?;
            return Self::new(tokenizer, config, &tokenizer_json);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_and_merges(&vocab, &merges, config);
        }
        Err(Error::NotFound {
            path: dir.to_path_buf(),
            message: "no `tokenizer.json` and no `vocab.json` + `merges.txt` in the folder".into(),
        })
    }

    /// Build from CLIP's `vocab.json` and `merges.txt` as transformers converts them
    /// (`convert_slow_tokenizer.CLIPConverter`).
    ///
    /// # Errors
    /// I/O and JSON errors naming the file; [`Error::ConfigField`] for a malformed merges line or
    /// a special token missing from the vocabulary.
    pub fn from_vocab_and_merges(
        vocab: &Path,
        merges: &Path,
        config: CLIPTokenizerConfig,
    ) -> Result<Self> {
        let vocab_value = read_json(vocab)?;
        let Value::Object(vocab_map) = &vocab_value else {
            return Err(field_error(
                vocab,
                "vocab",
                "not a JSON object of token ids",
            ));
        };
        let merges_text = std::fs::read_to_string(merges).map_err(|e| Error::io(merges, e))?;
        let mut merge_list = Vec::new();
        for (i, line) in merges_text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            if line.split(' ').count() != 2 {
                return Err(field_error(
                    merges,
                    "merges",
                    format!("line {} is not two symbols: {line:?}", i + 1),
                ));
            }
            merge_list.push(Value::String(line.to_string()));
        }
        let mut added = Vec::new();
        let mut seen = Vec::new();
        for token in [
            &config.unk_token,
            &config.bos_token,
            &config.eos_token,
            &config.pad_token,
        ] {
            if seen.contains(&token) {
                continue;
            }
            seen.push(token);
            let id = vocab_map
                .get(token.as_str())
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    field_error(
                        vocab,
                        "vocab",
                        format!("special token {token:?} is not in the vocabulary"),
                    )
                })?;
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
        }
        // transformers writes added tokens in id order.
        added.sort_by_key(|t| t["id"].as_u64());
        let bos_id = vocab_map[config.bos_token.as_str()].clone();
        let eos_id = vocab_map[config.eos_token.as_str()].clone();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN},
                 "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": true}
            ]},
            "post_processor": {"type": "RobertaProcessing",
                "sep": [config.eos_token, eos_id], "cls": [config.bos_token, bos_id],
                "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": config.unk_token,
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_value, "merges": merge_list}
        });
        let tokenizer = tokenizers::Tokenizer::from_str(&spec.to_string())
            .map_err(|e| field_error(merges, "merges", e.to_string()))?;
        Self::new(tokenizer, config, vocab)
    }

    fn new(
        tokenizer: tokenizers::Tokenizer,
        config: CLIPTokenizerConfig,
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
    pub fn config(&self) -> &CLIPTokenizerConfig {
        &self.config
    }

    /// `model_max_length` (77 for CLIP).
    pub fn model_max_length(&self) -> usize {
        self.config.model_max_length
    }

    /// `bos_token_id` (`<|startoftext|>`, 49406 in the real vocabulary).
    pub fn bos_token_id(&self) -> u32 {
        self.ids.bos
    }

    /// `eos_token_id` (`<|endoftext|>`, 49407 in the real vocabulary).
    pub fn eos_token_id(&self) -> u32 {
        self.ids.eos
    }

    /// `pad_token_id` (the eos id for SD 1.x, 0 for OpenCLIP folders).
    pub fn pad_token_id(&self) -> u32 {
        self.ids.pad
    }

    /// The vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The id of `token` in the vocabulary or among the added tokens
    /// (`convert_tokens_to_ids`), `None` when it has none.
    ///
    /// ```
    /// # fn main() -> diffusion_core::Result<()> {
    /// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
    /// let tokenizer = diffusion_models::CLIPTokenizer::from_pretrained(dir)?;
    /// assert_eq!(tokenizer.token_to_id("<|endoftext|>"), Some(tokenizer.eos_token_id()));
    /// # Ok(())
    /// # }
    /// ```
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Whether `token` is an added token (transformers' `added_tokens_encoder`: the special
    /// tokens and those of [`Self::add_tokens`]), matched exactly.
    ///
    /// ```
    /// # fn main() -> diffusion_core::Result<()> {
    /// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
    /// let mut tokenizer = diffusion_models::CLIPTokenizer::from_pretrained(dir)?;
    /// assert!(!tokenizer.is_added_token("<cat-toy>"));
    /// tokenizer.add_tokens(&["<cat-toy>"])?;
    /// assert!(tokenizer.is_added_token("<cat-toy>"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_added_token(&self, token: &str) -> bool {
        self.tokenizer
            .get_added_vocabulary()
            .get_vocab()
            .contains_key(token)
    }

    /// transformers' `add_tokens(tokens)`: each token is matched whole in the (normalised)
    /// text before BPE runs, and gets the next free id (`vocab_size`, `vocab_size + 1`, ...).
    /// Returns the ids, in order.
    ///
    /// ```
    /// # fn main() -> diffusion_core::Result<()> {
    /// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
    /// let mut tokenizer = diffusion_models::CLIPTokenizer::from_pretrained(dir)?;
    /// let first = tokenizer.vocab_size() as u32;
    /// assert_eq!(tokenizer.add_tokens(&["<cat-toy>", "<cat-toy>_1"])?, [first, first + 1]);
    /// let ids = tokenizer.encode("a <cat-toy>", false)?;
    /// assert_eq!(ids.last(), Some(&first));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`token`) when a token is empty, repeated, or already in the
    /// vocabulary (nothing is added then).
    pub fn add_tokens(&mut self, tokens: &[&str]) -> Result<Vec<u32>> {
        for (i, token) in tokens.iter().enumerate() {
            if token.is_empty() {
                return Err(Error::invalid_argument("token", "an added token is empty"));
            }
            if self.token_to_id(token).is_some() || tokens[..i].contains(token) {
                return Err(Error::invalid_argument(
                    "token",
                    format!("{token:?} is already in the tokenizer's vocabulary"),
                ));
            }
        }
        let added: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .map(|t| tokenizers::AddedToken::from(*t, false))
            .collect();
        self.tokenizer.add_tokens(&added);
        tokens
            .iter()
            .map(|t| {
                self.token_to_id(t).ok_or_else(|| {
                    Error::invalid_argument("token", format!("{t:?} could not be added"))
                })
            })
            .collect()
    }

    /// Remove added tokens, as diffusers' `unload_textual_inversion` does with a tokenizer:
    /// `tokens` (every non-special added token when `None`) leave the added vocabulary, and the
    /// remaining non-special added tokens are renumbered consecutively after the last special
    /// token, in their order. Returns `(removed ids, last special id)`; the ids are those before
    /// the change (what a text encoder's rows must follow, see
    /// [`crate::text_encoders::clip::CLIPTextTransformer::select_token_embeddings`]).
    ///
    /// ```
    /// # fn main() -> diffusion_core::Result<()> {
    /// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
    /// let mut tokenizer = diffusion_models::CLIPTokenizer::from_pretrained(dir)?;
    /// let base = tokenizer.vocab_size();
    /// tokenizer.add_tokens(&["<a>", "<b>"])?;
    /// let (removed, _) = tokenizer.remove_added_tokens(Some(&["<a>"]))?;
    /// assert_eq!(removed, [base as u32]);
    /// assert_eq!(tokenizer.token_to_id("<b>"), Some(base as u32));
    /// assert_eq!(tokenizer.vocab_size(), base + 1);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`tokens`) when none of `tokens` is a non-special added token
    /// (diffusers: "No tokens to remove found"), (`tokenizer`) if the tokenizer cannot be
    /// rebuilt.
    pub fn remove_added_tokens(&mut self, tokens: Option<&[&str]>) -> Result<(Vec<u32>, u32)> {
        let mut added: Vec<(u32, tokenizers::AddedToken)> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        added.sort_by_key(|(id, _)| *id);
        let last_special = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .next_back()
            .unwrap_or(self.ids.eos.max(self.ids.bos));
        let removed: Vec<(u32, String)> = added
            .iter()
            .filter(|(_, t)| !t.special)
            .filter(|(_, t)| tokens.is_none_or(|list| list.contains(&t.content.as_str())))
            .map(|(id, t)| (*id, t.content.clone()))
            .collect();
        if tokens.is_some() && removed.is_empty() {
            return Err(Error::invalid_argument(
                "tokens",
                format!("no added token to remove among {tokens:?}"),
            ));
        }
        let json = self
            .tokenizer
            .to_string(false)
            .map_err(|e| tokenizer_error(&e))?;
        let mut value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| tokenizer_error(&e))?;
        if let Some(list) = value.get_mut("added_tokens").and_then(|v| v.as_array_mut()) {
            list.retain(|t| {
                let content = t
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default();
                !removed.iter().any(|(_, r)| r == content)
            });
            let mut next = last_special + 1;
            for t in list.iter_mut() {
                if !t.get("special").and_then(|v| v.as_bool()).unwrap_or(false) {
                    t["id"] = serde_json::Value::from(next);
                    next += 1;
                }
            }
        }
        let json = serde_json::to_string(&value).map_err(|e| tokenizer_error(&e))?;
        self.tokenizer = <tokenizers::Tokenizer as std::str::FromStr>::from_str(&json)
            .map_err(|e| tokenizer_error(&e))?;
        Ok((
            removed.into_iter().map(|(id, _)| id).collect(),
            last_special,
        ))
    }

    /// transformers' `tokenize(prompt)`: the token strings of one prompt, without special
    /// tokens (an added token appears as the normalised text it matched).
    ///
    /// ```
    /// # fn main() -> diffusion_core::Result<()> {
    /// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
    /// let mut tokenizer = diffusion_models::CLIPTokenizer::from_pretrained(dir)?;
    /// tokenizer.add_tokens(&["<cat-toy>"])?;
    /// assert_eq!(tokenizer.tokens("A <Cat-Toy>")?.last().map(String::as_str), Some("<cat-toy>"));
    /// # Ok(())
    /// # }
    /// ```
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
    /// with bos/eos when `add_special_tokens`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`prompt`) when the tokenizer rejects the text.
    pub fn encode(&self, prompt: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(prompt, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::invalid_argument("prompt", e.to_string()))
    }

    /// `tokenizer(prompts, padding=padding, max_length=max_length, truncation=truncation)`:
    /// bos + text ids + eos per prompt; with truncation the text is cut so a row is at most
    /// `max_length` (default `model_max_length`) ids and still ends with eos; padding appends
    /// `pad_token_id` with mask 0. diffusers' pipelines call it with
    /// `(Padding::MaxLength, Some(77), true)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`max_length`) for a length below 2 (no room for bos and eos)
    /// with truncation, or for [`Padding::MaxLength`] without a finite length; as
    /// [`Self::encode`].
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

/// Read `special_tokens_map.json`, then `tokenizer_config.json`, of a tokenizer folder (both
/// optional; the later file wins) into the named token slots and `model_max_length`; a length
/// below `min_length` is refused.
///
/// # Errors
/// [`Error::Io`] / [`Error::Json`] for unreadable files, [`Error::ConfigField`] naming the file
/// and key for a token or `model_max_length` of the wrong type.
pub(crate) fn read_special_tokens(
    dir: &Path,
    tokens: &mut [(&str, &mut String)],
    model_max_length: &mut usize,
    min_length: u64,
) -> Result<()> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let value = read_json(&path)?;
        for (field, slot) in tokens.iter_mut() {
            match value.get(*field) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => **slot = s.clone(),
                // An `AddedToken` serialised as an object.
                Some(Value::Object(map)) => match map.get("content") {
                    Some(Value::String(s)) => **slot = s.clone(),
                    _ => return Err(field_error(&path, field, "token without `content`")),
                },
                Some(other) => {
                    return Err(field_error(&path, field, format!("not a token: {other}")));
                }
            }
        }
        match value.get("model_max_length") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                *model_max_length = match (n.as_u64(), n.as_f64()) {
                    (Some(v), _) if v >= min_length => usize::try_from(v).unwrap_or(NO_LIMIT),
                    // transformers writes its "no limit" as 1e30.
                    (None, Some(v)) if v >= 1.0 => {
                        if v >= usize::MAX as f64 {
                            NO_LIMIT
                        } else {
                            v as usize
                        }
                    }
                    _ => {
                        return Err(field_error(
                            &path,
                            "model_max_length",
                            format!("{n} is not a positive length"),
                        ));
                    }
                }
            }
            Some(other) => {
                return Err(field_error(
                    &path,
                    "model_max_length",
                    format!("not a number: {other}"),
                ));
            }
        }
    }
    Ok(())
}

/// The ids a tokenizer puts around each prompt (bos, eos) and pads rows with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpecialTokenIds {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
}

impl SpecialTokenIds {
    /// Look up `bos`, `eos` and `pad` in `tokenizer`'s vocabulary.
    ///
    /// # Errors
    /// [`Error::ConfigField`] naming `origin` and the token's key for a token the vocabulary
    /// does not have.
    pub fn resolve(
        tokenizer: &tokenizers::Tokenizer,
        origin: &Path,
        [bos, eos, pad]: [&str; 3],
    ) -> Result<Self> {
        let id = |field: &str, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                field_error(origin, field, format!("{token:?} is not in the vocabulary"))
            })
        };
        Ok(Self {
            bos: id("bos_token", bos)?,
            eos: id("eos_token", eos)?,
            pad: id("pad_token", pad)?,
        })
    }

    /// `bos + text + eos`.
    pub fn wrap(&self, text: Vec<u32>) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() + 2);
        ids.push(self.bos);
        ids.extend(text);
        ids.push(self.eos);
        ids
    }

    /// transformers' batch call on prompts whose text ids `encode` gives: each row is
    /// [`Self::wrap`]ped (its text cut to `max_length - 2` ids with `truncation`), then padded
    /// with `pad` and mask 0 as `padding` asks.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`max_length`) for a length below 2 with truncation, or for
    /// [`Padding::MaxLength`] without a finite length; as `encode`.
    pub fn tokenize<S: AsRef<str>>(
        &self,
        prompts: &[S],
        encode: impl Fn(&str) -> Result<Vec<u32>>,
        padding: Padding,
        max_length: usize,
        truncation: bool,
    ) -> Result<TokenizerOutput> {
        if truncation && max_length < 2 {
            return Err(Error::invalid_argument(
                "max_length",
                format!("{max_length} leaves no room for the bos and eos tokens"),
            ));
        }
        let mut rows = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let mut text = encode(prompt.as_ref())?;
            if truncation && max_length != NO_LIMIT {
                text.truncate(max_length - 2);
            }
            rows.push(self.wrap(text));
        }
        let target = match padding {
            Padding::DoNotPad => None,
            Padding::Longest => rows.iter().map(Vec::len).max(),
            Padding::MaxLength if max_length == NO_LIMIT => {
                return Err(Error::invalid_argument(
                    "max_length",
                    "padding to max_length needs a finite max_length (the tokenizer folder \
                     names no model_max_length)",
                ));
            }
            Padding::MaxLength => Some(max_length),
        };
        let mut output = TokenizerOutput::default();
        for mut ids in rows {
            let mut mask = vec![1; ids.len()];
            if let Some(target) = target
                && ids.len() < target
            {
                mask.resize(target, 0);
                ids.resize(target, self.pad);
            }
            output.input_ids.push(ids);
            output.attention_mask.push(mask);
        }
        Ok(output)
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

pub(crate) fn field_error(path: &Path, field: &str, message: impl Into<String>) -> Error {
    Error::ConfigField {
        path: PathBuf::from(path),
        field: field.to_string(),
        message: message.into(),
    }
}

fn tokenizer_error(e: &dyn std::fmt::Display) -> Error {
    Error::invalid_argument(
        "tokenizer",
        format!("could not rebuild the tokenizer without the removed tokens: {e}"),
    )
}
