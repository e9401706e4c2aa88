//! Textual-inversion embeddings (diffusers' `load_textual_inversion`): files that teach a CLIP
//! text encoder new words, each a token plus one or more learned input vectors.
//!
//! Layouts read (by their keys, whatever the file name):
//! - diffusers' `learned_embeds.safetensors` / `.bin`: one tensor `{token: [dim] or [n, dim]}`;
//! - A1111 `.safetensors`: `string_to_param.*` (`[n, dim]`) or `emb_params`;
//! - SDXL files with two tables, `clip_l` (first encoder) and `clip_g` (second encoder).
//!
//! `.bin` / `.pt` pickles are read through the restricted reader of
//! [`crate::single_file::torch_zip`], which executes nothing; tensors in nested dicts are named
//! `outer.inner`, so A1111's own `.pt` (`string_to_param: {"*": vectors}`) reads like its
//! `.safetensors`.
//!
//! A token with `n > 1` vectors is added as `<tok> <tok>_1 ... <tok>_{n-1}`, and
//! [`maybe_convert_prompt`] rewrites prompts to match, as diffusers does.
//!
//! ```no_run
//! use diffusion_loaders::textual_inversion::{TextualInversion, load_into};
//! use diffusion_models::{CLIPTextModel, CLIPTokenizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = diffusion_core::Device::default();
//! let mut tokenizer = CLIPTokenizer::from_pretrained("sd/tokenizer")?;
//! let mut text_encoder = CLIPTextModel::from_pretrained("sd/text_encoder", &device)?;
//! let file = TextualInversion::open("cat-toy/learned_embeds.safetensors")?;
//! let token = file.token_or(None);
//! let vectors = file.single_table()?;
//! load_into(&mut tokenizer, &mut text_encoder.text_model, &token, vectors, file.path())?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use diffusion_core::weights::SafetensorsFile;
use diffusion_core::{Error, Result};
use diffusion_models::CLIPTokenizer;
use diffusion_models::text_encoders::clip::CLIPTextTransformer;

use crate::single_file::pickle::StorageDtype;
use crate::single_file::torch_zip::TorchCheckpoint;

/// diffusers' `TEXT_INVERSION_NAME_SAFE`, looked for first in a folder.
pub const TEXT_INVERSION_NAME_SAFE: &str = "learned_embeds.safetensors";
/// diffusers' `TEXT_INVERSION_NAME`, the pickle fallback in a folder.
pub const TEXT_INVERSION_NAME: &str = "learned_embeds.bin";

/// The file layouts [`TextualInversion::open`] recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextualInversionLayout {
    /// diffusers: a single tensor named by its token.
    Diffusers,
    /// A1111: `string_to_param.*` or `emb_params`.
    A1111,
    /// SDXL: `clip_l` and `clip_g`.
    Sdxl,
}

/// The learned vectors of one table, row-major `f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingVectors {
    /// The tensor key they were read from.
    pub key: String,
    /// `num_vectors * dim` values.
    pub values: Vec<f32>,
    /// How many tokens the embedding spans.
    pub num_vectors: usize,
    /// The size of each vector.
    pub dim: usize,
}

/// A textual-inversion file, read.
#[derive(Clone, Debug)]
pub struct TextualInversion {
    path: PathBuf,
    layout: TextualInversionLayout,
    token: Option<String>,
    tables: Vec<EmbeddingVectors>,
}

impl TextualInversion {
    /// Read a `.safetensors` file, a `.bin` / `.pt` pickle, or a folder holding
    /// `learned_embeds.safetensors` (else `learned_embeds.bin`).
    ///
    /// ```no_run
    /// use diffusion_loaders::textual_inversion::{TextualInversion, TextualInversionLayout};
    /// # fn main() -> diffusion_core::Result<()> {
    /// let file = TextualInversion::open("sdxl-style.safetensors")?;
    /// assert_eq!(file.layout(), TextualInversionLayout::Sdxl);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownEmbeddingLayout`] for tensors that fit no layout (several
    /// unrelated tensors, a rank other than 1 or 2, zero vectors);
    /// the underlying [`Error`] for an unreadable or corrupt file (or an unsafe pickle).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = resolve(path.as_ref())?;
        let tensors = read_tensors(&path)?;
        let shapes: Vec<String> = tensors
            .iter()
            .map(|(k, _, s)| format!("{k} {s:?}"))
            .collect();
        let unknown = |message: &str| Error::UnknownEmbeddingLayout {
            path: path.clone(),
            keys: shapes.clone(),
            message: message.into(),
        };
        if tensors.is_empty() {
            return Err(unknown("the file holds no tensors"));
        }
        let find = |key: &str| tensors.iter().find(|(k, _, _)| k == key);
        let (layout, token, picked) = if let (Some(l), Some(g)) = (find("clip_l"), find("clip_g")) {
            (TextualInversionLayout::Sdxl, None, vec![l, g])
        } else if let Some(t) = find("string_to_param.*") {
            (TextualInversionLayout::A1111, None, vec![t])
        } else if let Some(t) = find("emb_params") {
            (TextualInversionLayout::A1111, None, vec![t])
        } else if tensors.len() == 1 {
            let t = &tensors[0];
            (
                TextualInversionLayout::Diffusers,
                Some(t.0.clone()),
                vec![t],
            )
        } else {
            return Err(unknown(
                "expected one tensor {token: [n, dim]}, `string_to_param.*` / `emb_params` \
                 (A1111), or `clip_l` + `clip_g` (SDXL)",
            ));
        };
        let mut tables = Vec::with_capacity(picked.len());
        for (key, values, shape) in picked {
            let (num_vectors, dim) = match shape[..] {
                [dim] => (1, dim),
                [n, dim] => (n, dim),
                _ => {
                    return Err(unknown(&format!(
                        "`{key}` is not a [dim] or [n, dim] tensor"
                    )));
                }
            };
            if num_vectors == 0 || dim == 0 {
                return Err(unknown(&format!("`{key}` holds no vectors")));
            }
            tables.push(EmbeddingVectors {
                key: key.clone(),
                values: values.clone(),
                num_vectors,
                dim,
            });
        }
        Ok(Self {
            path,
            layout,
            token,
            tables,
        })
    }

    /// The file read (inside a folder, the weight file found there).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layout recognised.
    pub fn layout(&self) -> TextualInversionLayout {
        self.layout
    }

    /// The token the file names (the key of a diffusers file); `None` for A1111 and SDXL
    /// files, whose safetensors hold no name.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The token to add: `token` when given (as diffusers' `token=`), else the file's own,
    /// else the file name without extension (A1111's convention).
    ///
    /// ```no_run
    /// # use diffusion_loaders::textual_inversion::TextualInversion;
    /// # fn main() -> diffusion_core::Result<()> {
    /// let file = TextualInversion::open("embeddings/bad-hands.safetensors")?;
    /// assert_eq!(file.token_or(Some("<hands>")), "<hands>");
    /// # Ok(())
    /// # }
    /// ```
    pub fn token_or(&self, token: Option<&str>) -> String {
        match (token, &self.token) {
            (Some(t), _) => t.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => self
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// The vectors of a single-table (diffusers or A1111) file.
    ///
    /// ```no_run
    /// # use diffusion_loaders::textual_inversion::TextualInversion;
    /// # fn main() -> diffusion_core::Result<()> {
    /// let file = TextualInversion::open("learned_embeds.safetensors")?;
    /// println!("{} vectors", file.single_table()?.num_vectors);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownEmbeddingLayout`] for an SDXL file (use [`Self::sdxl_tables`]).
    pub fn single_table(&self) -> Result<&EmbeddingVectors> {
        match (self.layout, self.tables.as_slice()) {
            (TextualInversionLayout::Diffusers | TextualInversionLayout::A1111, [t]) => Ok(t),
            _ => Err(self.layout_error("a two-table SDXL file needs an SDXL pipeline")),
        }
    }

    /// The `clip_l` and `clip_g` tables of an SDXL file.
    ///
    /// ```no_run
    /// # use diffusion_loaders::textual_inversion::TextualInversion;
    /// # fn main() -> diffusion_core::Result<()> {
    /// let file = TextualInversion::open("sdxl-style.safetensors")?;
    /// let (clip_l, clip_g) = file.sdxl_tables()?;
    /// assert_eq!(clip_l.num_vectors, clip_g.num_vectors);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownEmbeddingLayout`] for a single-table file.
    pub fn sdxl_tables(&self) -> Result<(&EmbeddingVectors, &EmbeddingVectors)> {
        match (self.layout, self.tables.as_slice()) {
            (TextualInversionLayout::Sdxl, [l, g]) => Ok((l, g)),
            _ => Err(self
                .layout_error("an SDXL pipeline needs a file with `clip_l` and `clip_g` tables")),
        }
    }

    fn layout_error(&self, message: &str) -> Error {
        Error::UnknownEmbeddingLayout {
            path: self.path.clone(),
            keys: self
                .tables
                .iter()
                .map(|t| format!("{} {:?}", t.key, [t.num_vectors, t.dim]))
                .collect(),
            message: message.into(),
        }
    }
}

/// A folder is searched for diffusers' file names; a file is taken as it is.
fn resolve(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    [TEXT_INVERSION_NAME_SAFE, TEXT_INVERSION_NAME]
        .iter()
        .map(|name| path.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NotFound {
            path: path.to_path_buf(),
            message: format!(
                "no `{TEXT_INVERSION_NAME_SAFE}` or `{TEXT_INVERSION_NAME}` in the folder"
            ),
        })
}

type NamedValues = (String, Vec<f32>, Vec<usize>);

/// Every float tensor of the file, by content: a zip archive is a `torch.save` pickle,
/// anything else safetensors.
fn read_tensors(path: &Path) -> Result<Vec<NamedValues>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4);
    std::fs::File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut head))
        .map_err(|e| diffusion_core::Error::io(path, e))?;
    let mut out = Vec::new();
    if head == b"PK\x03\x04" {
        let ckpt = TorchCheckpoint::open(path)?;
        for key in ckpt.keys() {
            // A1111 files also hold integer tensors (`string_to_token.*`): only floats are vectors.
            let is_float = ckpt.tensor(key).is_some_and(|t| {
                matches!(
                    t.dtype,
                    StorageDtype::F32 | StorageDtype::F64 | StorageDtype::F16 | StorageDtype::BF16
                )
            });
            if !is_float {
                continue;
            }
            let (values, shape) = ckpt.read_f32(key)?;
            out.push((key.to_string(), values, shape));
        }
    } else {
        let file = SafetensorsFile::open(path)?;
        for key in file.keys() {
            let (values, shape) = file.read_f32(&key)?;
            out.push((key, values, shape));
        }
    }
    Ok(out)
}

/// The tokens an embedding of `num_vectors` vectors adds: `token`, `token_1`, ...
///
/// ```
/// use diffusion_loaders::textual_inversion::expanded_tokens;
/// assert_eq!(expanded_tokens("<t>", 3), ["<t>", "<t>_1", "<t>_2"]);
/// ```
pub fn expanded_tokens(token: &str, num_vectors: usize) -> Vec<String> {
    (0..num_vectors.max(1))
        .map(|i| match i {
            0 => token.to_string(),
            i => format!("{token}_{i}"),
        })
        .collect()
}

/// Check that `vectors` can be added as `token` to this tokenizer / encoder pair, changing
/// nothing: no clash with the vocabulary, and the encoder's hidden size.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use diffusion_loaders::textual_inversion::{EmbeddingVectors, check};
/// use diffusion_models::{CLIPTextConfig, CLIPTextModel, CLIPTokenizer};
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
/// let tokenizer = CLIPTokenizer::from_pretrained(dir)?;
/// let config = CLIPTextConfig { vocab_size: 1000, hidden_size: 8, intermediate_size: 8,
///     num_hidden_layers: 1, num_attention_heads: 1, ..CLIPTextConfig::default() };
/// let encoder = CLIPTextModel::new(&config, &diffusion_core::Device::default())?;
/// let vectors = EmbeddingVectors { key: "<t>".into(), values: vec![0.0; 4], num_vectors: 1, dim: 4 };
/// assert!(check(&tokenizer, &encoder.text_model, "<t>", &vectors, "t.safetensors".as_ref()).is_err());
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`Error::TokenInVocabulary`] when the token or `token_1` is already a word
/// (or the token is empty); [`Error::EmbeddingDim`] when the vectors' size is
/// not the encoder's `hidden_size`.
pub fn check(
    tokenizer: &CLIPTokenizer,
    text_model: &CLIPTextTransformer,
    token: &str,
    vectors: &EmbeddingVectors,
    path: &Path,
) -> Result<()> {
    for candidate in [token.to_string(), format!("{token}_1")] {
        if token.is_empty() || tokenizer.token_to_id(&candidate).is_some() {
            return Err(Error::TokenInVocabulary {
                path: path.to_path_buf(),
                token: candidate,
            });
        }
    }
    let expected = text_model.config().hidden_size;
    if vectors.dim != expected {
        return Err(Error::EmbeddingDim {
            path: path.to_path_buf(),
            table: vectors.key.clone(),
            expected,
            got: vectors.dim,
        });
    }
    Ok(())
}

/// diffusers' `load_textual_inversion` for one tokenizer / encoder pair: after [`check`], add
/// the [`expanded_tokens`] to the tokenizer, grow the token embedding to the tokenizer's new
/// size (`resize_token_embeddings(len(tokenizer) + n)`), and write the vectors at the new ids
/// in the encoder's dtype. Returns the tokens added.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use diffusion_loaders::textual_inversion::{EmbeddingVectors, load_into};
/// use diffusion_models::{CLIPTextConfig, CLIPTextModel, CLIPTokenizer};
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
/// let mut tokenizer = CLIPTokenizer::from_pretrained(dir)?;
/// let config = CLIPTextConfig { vocab_size: 1000, hidden_size: 4, intermediate_size: 8,
///     num_hidden_layers: 1, num_attention_heads: 1, ..CLIPTextConfig::default() };
/// let mut encoder = CLIPTextModel::new(&config, &diffusion_core::Device::default())?;
/// let vectors = EmbeddingVectors { key: "<t>".into(), values: vec![0.5; 8], num_vectors: 2, dim: 4 };
/// let added = load_into(&mut tokenizer, &mut encoder.text_model, "<t>", &vectors, "t.bin".as_ref())?;
/// assert_eq!(added, ["<t>", "<t>_1"]);
/// assert_eq!(encoder.config().vocab_size, 1002);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// As [`check`]; the underlying [`Error`] when the tokenizer refuses a token.
pub fn load_into(
    tokenizer: &mut CLIPTokenizer,
    text_model: &mut CLIPTextTransformer,
    token: &str,
    vectors: &EmbeddingVectors,
    path: &Path,
) -> Result<Vec<String>> {
    check(tokenizer, text_model, token, vectors, path)?;
    let tokens = expanded_tokens(token, vectors.num_vectors);
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let new_size = tokenizer.vocab_size() + tokens.len();
    let ids = tokenizer.add_tokens(&refs)?;
    text_model.resize_token_embeddings(new_size)?;
    for (row, id) in vectors.values.chunks(vectors.dim).zip(ids) {
        text_model.set_token_embeddings(id as usize, row)?;
    }
    log::info!(
        "{}: loaded textual inversion embedding for {token} ({} vectors)",
        path.display(),
        tokens.len()
    );
    Ok(tokens)
}

/// diffusers' `unload_textual_inversion` for one tokenizer / encoder pair: remove `tokens`
/// (every non-special added token when `None`) from the tokenizer, renumber the added tokens
/// that stay, and rebuild the encoder's token embedding to match (the rows up to the last
/// special token, then the rows of the tokens that stay, in order). Returns the ids removed.
///
/// # Errors
/// [`Error::InvalidArgument`] (`tokens`) when none of `tokens` was added; nothing changes then.
pub fn unload_from(
    tokenizer: &mut CLIPTokenizer,
    text_model: &mut CLIPTextTransformer,
    tokens: Option<&[&str]>,
) -> Result<Vec<u32>> {
    let mut updated = tokenizer.clone();
    let (removed, last_special) = updated.remove_added_tokens(tokens)?;
    let rows = text_model.config().vocab_size;
    let keep: Vec<usize> = (0..rows)
        .filter(|&r| r <= last_special as usize || !removed.contains(&(r as u32)))
        .collect();
    text_model.select_token_embeddings(&keep)?;
    *tokenizer = updated;
    log::info!("unloaded {} textual inversion token(s)", removed.len());
    Ok(removed)
}

/// diffusers' `maybe_convert_prompt`: every added token of the tokenizer that has
/// multi-vector companions (`<tok>_1`, `<tok>_2`, ...) and occurs in the prompt is replaced, at
/// each occurrence, by `<tok> <tok>_1 ...`; other prompts come back unchanged.
///
/// ```
/// # fn main() -> diffusion_core::Result<()> {
/// use diffusion_loaders::textual_inversion::maybe_convert_prompt;
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
/// let mut tokenizer = diffusion_models::CLIPTokenizer::from_pretrained(dir)?;
/// tokenizer.add_tokens(&["<t>", "<t>_1", "<t>_2"])?;
/// assert_eq!(maybe_convert_prompt("a <t> toy", &tokenizer)?, "a <t> <t>_1 <t>_2 toy");
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// As [`CLIPTokenizer::tokens`].
pub fn maybe_convert_prompt(
    prompt: &str,
    tokenizer: &CLIPTokenizer,
) -> diffusion_core::Result<String> {
    let mut seen: Vec<String> = Vec::new();
    for token in tokenizer.tokens(prompt)? {
        if !seen.contains(&token) {
            seen.push(token);
        }
    }
    let mut prompt = prompt.to_string();
    for token in seen {
        if !tokenizer.is_added_token(&token) {
            continue;
        }
        let mut replacement = token.clone();
        let mut i = 1;
        while tokenizer.is_added_token(&format!("{token}_{i}")) {
            replacement.push_str(&format!(" {token}_{i}"));
            i += 1;
        }
        if i > 1 {
            prompt = prompt.replace(&token, &replacement);
        }
    }
    Ok(prompt)
}

/// [`maybe_convert_prompt`] over a batch.
///
/// ```
/// # fn main() -> diffusion_core::Result<()> {
/// use diffusion_loaders::textual_inversion::maybe_convert_prompts;
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/sd/sd1/tokenizer");
/// let tokenizer = diffusion_models::CLIPTokenizer::from_pretrained(dir)?;
/// let prompts = vec!["a cat".to_string()];
/// assert_eq!(maybe_convert_prompts(&prompts, &tokenizer)?, prompts);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// As [`maybe_convert_prompt`].
pub fn maybe_convert_prompts(
    prompts: &[String],
    tokenizer: &CLIPTokenizer,
) -> diffusion_core::Result<Vec<String>> {
    prompts
        .iter()
        .map(|p| maybe_convert_prompt(p, tokenizer))
        .collect()
}
