//! LoRA adapters for the UNet and the CLIP text encoders, with diffusers' API:
//! [`LoraState::load_lora_weights`], [`LoraState::set_adapters`], a runtime
//! [`LoraState::set_lora_scale`], [`LoraState::fuse_lora`] / [`LoraState::unfuse_lora`],
//! [`LoraState::unload_lora_weights`] and [`LoraState::save_lora_weights`].
//!
//! Files in PEFT / diffusers spelling and in kohya / A1111 spelling are read (see
//! `format.rs` for the key forms; kohya's SDXL UNet names in the original sgm layout,
//! `lora_unet_input_blocks_4_1_...`, are mapped as diffusers maps them), with LoCon convolution LoRA (`k×k` down, `1×1` up) on any
//! convolution, per-module `.alpha`s and the `lora_adapter_metadata` (`lora_alpha`,
//! `alpha_pattern`, `use_rslora`) that diffusers writes.
//!
//! # How LoRA is applied
//!
//! The models have no LoRA branch in their forward pass: every change of the adapter set, the
//! weights or the scale rewrites the targeted weights as
//! `W = W0 + Σ_i coef_i · (alpha_i / rank_i) · B_i A_i` from the kept originals `W0`, where
//! `coef_i` is the adapter weight times the runtime scale (or the `lora_scale` of a fuse).
//! This is peft's merged form, so a forward pass costs what the base model costs, and
//! [`LoraState::unload_lora_weights`] puts the kept originals back bit for bit instead of
//! subtracting. A [`LoraState`] must always be given the same models it loaded into.

mod format;
mod merge;
mod save;
mod sgm;
mod weights;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::{Device, Error, Result};
use diffusion_models::state_dict::{LoadMode, map_params_by_key, param_shapes};
use diffusion_models::{CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel};

use format::{ModuleName, RawLayer, StoredTensor, read_lora};
use merge::Merger;
use weights::{ResolvedWeights, UNetLayout, resolve};

pub use weights::{AdapterWeights, BlockWeights, UNetWeights};

/// A model a LoRA file can adapt, named by its state-dict prefix in diffusers' files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraComponent {
    /// `unet.` (kohya `lora_unet_`).
    Unet,
    /// `text_encoder.` (kohya `lora_te_` / `lora_te1_`).
    TextEncoder,
    /// `text_encoder_2.` (kohya `lora_te2_`), SDXL's second text encoder.
    TextEncoder2,
}

impl LoraComponent {
    /// Every component, in file order.
    pub const ALL: [Self; 3] = [Self::Unet, Self::TextEncoder, Self::TextEncoder2];

    /// The prefix of this component's keys in PEFT files (`unet`, `text_encoder`,
    /// `text_encoder_2`).
    ///
    /// ```
    /// use diffusion_loaders::lora::LoraComponent;
    /// assert_eq!(LoraComponent::TextEncoder2.prefix(), "text_encoder_2");
    /// ```
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    pub(crate) fn from_prefix(prefix: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.prefix() == prefix)
    }
}

/// The models of a pipeline that LoRA adapts, borrowed for one call.
///
/// ```no_run
/// # use diffusion_loaders::lora::LoraModels;
/// # fn f(unet: &mut diffusion_models::UNet2DConditionModel,
/// #      te: &mut diffusion_models::CLIPTextModel) {
/// let models = LoraModels::new().unet(unet).text_encoder(te);
/// # }
/// ```
#[derive(Default)]
pub struct LoraModels<'a> {
    unet: Option<&'a mut UNet2DConditionModel>,
    text_encoder: Option<&'a mut CLIPTextModel>,
    text_encoder_2: Option<&'a mut CLIPTextModelWithProjection>,
}

impl<'a> LoraModels<'a> {
    /// No models.
    pub fn new() -> Self {
        Self::default()
    }

    /// With the UNet.
    pub fn unet(mut self, unet: &'a mut UNet2DConditionModel) -> Self {
        self.unet = Some(unet);
        self
    }

    /// With the (first) text encoder.
    pub fn text_encoder(mut self, text_encoder: &'a mut CLIPTextModel) -> Self {
        self.text_encoder = Some(text_encoder);
        self
    }

    /// With SDXL's second text encoder.
    pub fn text_encoder_2(mut self, text_encoder_2: &'a mut CLIPTextModelWithProjection) -> Self {
        self.text_encoder_2 = Some(text_encoder_2);
        self
    }

    fn has(&self, component: LoraComponent) -> bool {
        match component {
            LoraComponent::Unet => self.unet.is_some(),
            LoraComponent::TextEncoder => self.text_encoder.is_some(),
            LoraComponent::TextEncoder2 => self.text_encoder_2.is_some(),
        }
    }

    /// Parameter keys and PyTorch shapes of a component, `None` when it is not given.
    fn shapes(&self, component: LoraComponent) -> Option<BTreeMap<String, Vec<usize>>> {
        match component {
            LoraComponent::Unet => self.unet.as_deref().map(param_shapes),
            LoraComponent::TextEncoder => self.text_encoder.as_deref().map(param_shapes),
            LoraComponent::TextEncoder2 => self.text_encoder_2.as_deref().map(param_shapes),
        }
    }

    /// The module table of a component, built once per load; `None` when it is not given.
    fn shapes_cached<'t>(
        &self,
        component: LoraComponent,
        tables: &'t mut HashMap<LoraComponent, ModuleTable>,
    ) -> Option<&'t ModuleTable> {
        if let std::collections::hash_map::Entry::Vacant(slot) = tables.entry(component) {
            slot.insert(ModuleTable::new(component, self.shapes(component)?));
        }
        tables.get(&component)
    }

    fn device(&self, component: LoraComponent) -> Option<Device> {
        let devices = match component {
            LoraComponent::Unet => self.unet.as_deref()?.devices(),
            LoraComponent::TextEncoder => self.text_encoder.as_deref()?.devices(),
            LoraComponent::TextEncoder2 => self.text_encoder_2.as_deref()?.devices(),
        };
        devices.into_iter().next()
    }

    fn merge(&mut self, component: LoraComponent, merger: &mut Merger<'_>) {
        // Cloning a module clones parameter handles, not tensor data.
        match component {
            LoraComponent::Unet => {
                if let Some(m) = self.unet.as_deref_mut() {
                    *m = map_params_by_key(m.clone(), merger);
                }
            }
            LoraComponent::TextEncoder => {
                if let Some(m) = self.text_encoder.as_deref_mut() {
                    *m = map_params_by_key(m.clone(), merger);
                }
            }
            LoraComponent::TextEncoder2 => {
                if let Some(m) = self.text_encoder_2.as_deref_mut() {
                    *m = map_params_by_key(m.clone(), merger);
                }
            }
        }
    }
}

/// Options of [`LoraState::load_lora_weights_with`].
///
/// ```no_run
/// use diffusion_loaders::lora::{LoraLoadOptions, LoraModels, LoraState};
/// use diffusion_models::state_dict::LoadMode;
///
/// # fn f(unet: &mut diffusion_models::UNet2DConditionModel) -> diffusion_core::Result<()> {
/// // A LoRA with text-encoder layers, used on the UNet alone.
/// let options = LoraLoadOptions { mode: LoadMode::Lenient, ..Default::default() };
/// let mut lora = LoraState::new();
/// let mut models = LoraModels::new().unet(unet);
/// let report = lora.load_lora_weights_with(&mut models, "style.safetensors", "style", options)?;
/// for key in &report.unmatched_keys {
///     eprintln!("not loaded: {key}");
/// }
/// // A Hub repository with several files: name the one to load.
/// let options = LoraLoadOptions {
///     weight_name: Some("pixel-art-xl.safetensors".into()),
///     ..Default::default()
/// };
/// lora.load_lora_weights_with(&mut models, "nerijs/pixel-art-xl", "pixel", options)?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoraLoadOptions {
    /// [`LoadMode::Strict`] (default): keys that match no module are an error;
    /// [`LoadMode::Lenient`]: they are listed in the report and the rest is loaded.
    pub mode: LoadMode,
    /// The file inside a folder or Hub repository (diffusers' `weight_name`); default:
    /// `pytorch_lora_weights.safetensors`, else the only `.safetensors` file there.
    pub weight_name: Option<String>,
    /// How to reach the Hub when the name given is a repository id.
    pub hub: crate::hub::HubOptions,
}

/// What [`LoraState::load_lora_weights`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoraLoadReport {
    /// Adapted modules, as `<component>.<module path>` (`unet.mid_block.resnets.0.conv1`).
    pub matched_modules: Vec<String>,
    /// File keys that match no module of the given models, sorted.
    pub unmatched_keys: Vec<String>,
}

/// One adapted module of an adapter: `delta = scale · up · down` in PyTorch layout.
#[derive(Clone, Debug)]
struct LoraLayer {
    /// `[rank, in · k · k]`.
    down: Tensor<2>,
    /// `[out, rank]`.
    up: Tensor<2>,
    /// `lora_B.bias` as `[out, 1]`.
    up_bias: Option<Tensor<2>>,
    down_shape: Vec<usize>,
    up_shape: Vec<usize>,
    alpha: f32,
    /// `alpha / rank` (`alpha / sqrt(rank)` with rsLoRA).
    scale: f32,
}

impl LoraLayer {
    fn rank(&self) -> usize {
        self.down_shape[0]
    }
}

/// A loaded adapter: per component, per module path, its layer.
#[derive(Clone, Debug, Default)]
struct Adapter {
    layers: BTreeMap<LoraComponent, BTreeMap<String, LoraLayer>>,
}

/// Named LoRA adapters applied to a pipeline's models, with diffusers' LoRA API.
///
/// ```no_run
/// use diffusion_core::Device;
/// use diffusion_loaders::lora::{LoraModels, LoraState};
/// use diffusion_models::{CLIPTextModel, ModelMixin, UNet2DConditionModel};
///
/// # fn main() -> diffusion_core::Result<()> {
/// let device = Device::flex();
/// let mut unet = UNet2DConditionModel::from_pretrained("sd/unet", &device)?;
/// let mut text_encoder = CLIPTextModel::from_pretrained("sd/text_encoder", &device)?;
/// let mut lora = LoraState::new();
/// let mut models = LoraModels::new().unet(&mut unet).text_encoder(&mut text_encoder);
/// lora.load_lora_weights(&mut models, "pixel.safetensors", "pixel")?;
/// lora.load_lora_weights(&mut models, "toy_kohya.safetensors", "toy")?;
/// lora.set_adapters(&mut models, &["pixel", "toy"], &[0.7, 0.3])?;
/// lora.set_lora_scale(&mut models, 0.8)?;
/// // ... run the pipeline ...
/// lora.unload_lora_weights(&mut models)?; // the base weights, bit for bit
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct LoraState {
    adapters: BTreeMap<String, Adapter>,
    /// Load order, for [`Self::get_list_adapters`].
    order: Vec<String>,
    active: Vec<(String, ResolvedWeights)>,
    enabled: bool,
    scale: f32,
    /// The adapters and the `lora_scale` baked in by [`Self::fuse_lora`].
    fused: Option<(Vec<(String, ResolvedWeights)>, f32)>,
    originals: HashMap<LoraComponent, HashMap<String, Tensor<1>>>,
}

impl Default for LoraState {
    fn default() -> Self {
        Self::new()
    }
}

fn lora_error(message: impl Into<String>) -> Error {
    Error::invalid_argument("lora", message)
}

fn flat_name(path: &str) -> String {
    path.replace('.', "_")
}

/// Module paths of a component (parameters named `<path>.weight`), and kohya's names of them.
struct ModuleTable {
    shapes: BTreeMap<String, Vec<usize>>,
    kohya: HashMap<String, String>,
    text_model_prefix: bool,
    /// Resnets per down block, for kohya's SDXL (sgm layout) names; UNet only.
    layers_per_block: Option<usize>,
}

impl ModuleTable {
    fn new(component: LoraComponent, shapes: BTreeMap<String, Vec<usize>>) -> Self {
        let text_model_prefix = component != LoraComponent::Unet;
        let mut kohya = HashMap::new();
        for key in shapes.keys() {
            let Some(path) = key.strip_suffix(".weight") else {
                continue;
            };
            kohya.insert(flat_name(path), path.to_string());
            // transformers 5 saves CLIP without its `text_model.` level: accept both spellings.
            if text_model_prefix && let Some(inner) = path.strip_prefix("text_model.") {
                kohya.insert(flat_name(inner), path.to_string());
            }
        }
        let layers_per_block = (component == LoraComponent::Unet)
            .then(|| {
                shapes
                    .keys()
                    .filter_map(|k| k.strip_prefix("down_blocks.0.resnets.")?.split('.').next())
                    .filter_map(|l| l.parse::<usize>().ok())
                    .max()
                    .map(|l| l + 1)
            })
            .flatten();
        Self {
            shapes,
            kohya,
            text_model_prefix,
            layers_per_block,
        }
    }

    fn resolve(&self, name: &ModuleName) -> Option<String> {
        let has = |p: &str| self.shapes.contains_key(&format!("{p}.weight"));
        match name {
            ModuleName::Dotted(p) if has(p) => Some(p.clone()),
            ModuleName::Dotted(p) if self.text_model_prefix && has(&format!("text_model.{p}")) => {
                Some(format!("text_model.{p}"))
            }
            ModuleName::Dotted(_) => None,
            ModuleName::Kohya(flat) => self.kohya.get(flat).cloned().or_else(|| {
                let diffusers = sgm::sgm_to_diffusers(flat, self.layers_per_block?)?;
                self.kohya.get(&diffusers).cloned()
            }),
        }
    }

    fn has_bias(&self, module: &str) -> bool {
        self.shapes.contains_key(&format!("{module}.bias"))
    }

    fn weight_shape(&self, module: &str) -> &[usize] {
        &self.shapes[&format!("{module}.weight")]
    }
}

fn tensor2(t: &StoredTensor, rows: usize, device: &Device) -> Tensor<2> {
    let cols = t.values.len() / rows.max(1);
    Tensor::from_data(TensorData::new(t.values.clone(), [rows, cols]), device)
}

/// Check a layer's factors against the module weight and build it.
fn build_layer(
    path: &Path,
    raw: &RawLayer,
    weight: &[usize],
    alpha_default: Option<f32>,
    rslora: bool,
    device: &Device,
) -> Result<LoraLayer> {
    let first = raw.keys.first().cloned().unwrap_or_default();
    let (Some(down), Some(up)) = (&raw.down, &raw.up) else {
        let which = if raw.down.is_none() {
            "down (lora_A)"
        } else {
            "up (lora_B)"
        };
        return Err(lora_error(format!(
            "{}: the layer of `{first}` has no {which} tensor",
            path.display()
        )));
    };
    let out = weight[0];
    let columns: usize = weight[1..].iter().product();
    let rank = down.shape.first().copied().unwrap_or(0);
    let shape_error = |t: &StoredTensor, expected: Vec<usize>| Error::TensorShape {
        path: path.to_path_buf(),
        key: t.key.clone(),
        expected,
        got: t.shape.clone(),
    };
    if rank == 0 || down.values.len() != rank * columns {
        let mut expected = vec![rank.max(1)];
        expected.extend_from_slice(&weight[1..]);
        return Err(shape_error(down, expected));
    }
    if up.shape.first() != Some(&out) || up.values.len() != out * rank {
        let mut expected = vec![out, rank];
        expected.extend(std::iter::repeat_n(1, weight.len().saturating_sub(2)));
        return Err(shape_error(up, expected));
    }
    if let Some(bias) = &raw.up_bias
        && bias.values.len() != out
    {
        return Err(shape_error(bias, vec![out]));
    }
    let alpha = raw.alpha.or(alpha_default).unwrap_or(rank as f32);
    let scale = if rslora {
        alpha / (rank as f32).sqrt()
    } else {
        alpha / rank as f32
    };
    Ok(LoraLayer {
        down: tensor2(down, rank, device),
        up: tensor2(up, out, device),
        up_bias: raw.up_bias.as_ref().map(|b| tensor2(b, out, device)),
        down_shape: down.shape.clone(),
        up_shape: up.shape.clone(),
        alpha,
        scale,
    })
}

impl LoraState {
    /// No adapters; scale 1.
    pub fn new() -> Self {
        Self {
            adapters: BTreeMap::new(),
            order: Vec::new(),
            active: Vec::new(),
            enabled: true,
            scale: 1.0,
            fused: None,
            originals: HashMap::new(),
        }
    }

    /// Load a LoRA file as adapter `adapter_name` (strict) and make it the only active adapter,
    /// with weight 1, as diffusers' `load_lora_weights` does. `path` is a `.safetensors` file,
    /// a folder, or a Hub repository id; in a folder or repository the file is
    /// [`LORA_WEIGHT_NAME_SAFE`], else the only `.safetensors` file (name another one with
    /// [`LoraLoadOptions::weight_name`]).
    ///
    /// # Errors
    /// As [`Self::load_lora_weights_with`].
    pub fn load_lora_weights(
        &mut self,
        models: &mut LoraModels<'_>,
        path: impl AsRef<Path>,
        adapter_name: &str,
    ) -> Result<LoraLoadReport> {
        self.load_lora_weights_with(models, path, adapter_name, LoraLoadOptions::default())
    }

    /// As [`Self::load_lora_weights`], with options.
    ///
    /// # Errors
    /// [`Error::UnexpectedTensors`] listing every key that matches no module of `models`
    /// (strict mode: a LoRA for another base model, or for a component not given);
    /// [`Error::TensorShape`] naming a factor whose shape does not fit its module;
    /// [`Error::InvalidArgument`] for a name already loaded, a layer missing one factor, or
    /// while fused; [`Error::Unsupported`] for DoRA; file errors from reading.
    pub fn load_lora_weights_with(
        &mut self,
        models: &mut LoraModels<'_>,
        path: impl AsRef<Path>,
        adapter_name: &str,
        options: LoraLoadOptions,
    ) -> Result<LoraLoadReport> {
        if self.adapters.contains_key(adapter_name) {
            return Err(lora_error(format!(
                "adapter `{adapter_name}` is already loaded; delete it or choose another name"
            )));
        }
        let name = path.as_ref().to_string_lossy();
        let path = &crate::hub::resolve_weight_file(
            &name,
            None,
            options.weight_name.as_deref(),
            LORA_WEIGHT_NAME_SAFE,
            &options.hub,
        )?;
        self.check_unfused("load_lora_weights")?;
        let raw = read_lora(path)?;
        let mut unmatched = raw.unknown.clone();
        let mut tables: HashMap<LoraComponent, ModuleTable> = HashMap::new();
        let mut resolved = Vec::new();
        for ((component, name), layer) in &raw.layers {
            let Some(table) = models.shapes_cached(*component, &mut tables) else {
                unmatched.extend(layer.keys.iter().cloned());
                continue;
            };
            match table.resolve(name) {
                Some(module) => resolved.push((*component, module, layer)),
                None => unmatched.extend(layer.keys.iter().cloned()),
            }
        }
        unmatched.sort();
        // Unmatched keys are reported before any shape is checked: a LoRA for another base
        // model is named as such, not by its first odd shape.
        if options.mode == LoadMode::Strict && !unmatched.is_empty() {
            return Err(Error::UnexpectedTensors {
                path: path.to_path_buf(),
                keys: unmatched,
            });
        }
        let mut adapter = Adapter::default();
        let mut matched = Vec::new();
        for (component, module, layer) in resolved {
            let config = raw.configs.get(&component).cloned().unwrap_or_default();
            let device = models
                .device(component)
                .ok_or_else(|| lora_error(format!("{} has no parameters", component.prefix())))?;
            let built = build_layer(
                path,
                layer,
                tables[&component].weight_shape(&module),
                config.alpha_for(&module),
                config.use_rslora,
                &device,
            )?;
            if built.up_bias.is_some() && !tables[&component].has_bias(&module) {
                return Err(lora_error(format!(
                    "{}: `{module}` has a lora_B bias but the module has no bias to add it to",
                    path.display()
                )));
            }
            matched.push(format!("{}.{module}", component.prefix()));
            let previous = adapter
                .layers
                .entry(component)
                .or_default()
                .insert(module.clone(), built);
            if previous.is_some() {
                return Err(lora_error(format!(
                    "{}: module `{module}` is adapted twice (two spellings of one layer)",
                    path.display()
                )));
            }
        }
        self.adapters.insert(adapter_name.to_string(), adapter);
        self.order.push(adapter_name.to_string());
        self.active = vec![(adapter_name.to_string(), ResolvedWeights::uniform(1.0))];
        self.apply(models);
        Ok(LoraLoadReport {
            matched_modules: matched,
            unmatched_keys: unmatched,
        })
    }

    /// Activate `adapter_names` with `weights` (one per name; empty means 1 for each), as
    /// diffusers' `set_adapters(names, adapter_weights=[...])` with numbers.
    ///
    /// # Errors
    /// As [`Self::set_adapters_with_weights`].
    pub fn set_adapters(
        &mut self,
        models: &mut LoraModels<'_>,
        adapter_names: &[&str],
        weights: &[f32],
    ) -> Result<()> {
        let weights: Vec<AdapterWeights> = weights.iter().map(|w| (*w).into()).collect();
        self.set_adapters_with_weights(models, adapter_names, &weights)
    }

    /// Activate `adapter_names` with per-component and per-block `weights` (diffusers'
    /// `set_adapters` with dicts; empty means 1 for each).
    ///
    /// # Errors
    /// [`Error::UnknownName`] for a name not loaded; [`Error::InvalidArgument`] when the
    /// lengths differ, while fused, or for block weights that name a block without
    /// transformers or give the wrong number of weights.
    pub fn set_adapters_with_weights(
        &mut self,
        models: &mut LoraModels<'_>,
        adapter_names: &[&str],
        weights: &[AdapterWeights],
    ) -> Result<()> {
        self.check_unfused("set_adapters")?;
        if !weights.is_empty() && weights.len() != adapter_names.len() {
            return Err(lora_error(format!(
                "{} adapter names but {} weights",
                adapter_names.len(),
                weights.len()
            )));
        }
        for name in adapter_names {
            self.check_known(name)?;
        }
        let layout = models
            .shapes(LoraComponent::Unet)
            .map(|shapes| UNetLayout::from_keys(shapes.keys()));
        let mut active = Vec::with_capacity(adapter_names.len());
        for (i, name) in adapter_names.iter().enumerate() {
            let resolved = match weights.get(i) {
                Some(w) => resolve(w, layout.as_ref())?,
                None => ResolvedWeights::uniform(1.0),
            };
            active.push((name.to_string(), resolved));
        }
        self.active = active;
        self.enabled = true;
        self.apply(models);
        Ok(())
    }

    /// The runtime LoRA scale (diffusers' `cross_attention_kwargs={"scale": s}` and the
    /// pipelines' `lora_scale`), multiplying every active adapter's weight. Default 1.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] while fused (the fused scale is fixed; unfuse first).
    pub fn set_lora_scale(&mut self, models: &mut LoraModels<'_>, scale: f32) -> Result<()> {
        self.check_unfused("set_lora_scale")?;
        self.scale = scale;
        self.apply(models);
        Ok(())
    }

    /// The runtime LoRA scale.
    pub fn lora_scale(&self) -> f32 {
        self.scale
    }

    /// Run the base weights while keeping the adapters (diffusers' `disable_lora`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] while fused.
    pub fn disable_lora(&mut self, models: &mut LoraModels<'_>) -> Result<()> {
        self.check_unfused("disable_lora")?;
        self.enabled = false;
        self.apply(models);
        Ok(())
    }

    /// Undo [`Self::disable_lora`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] while fused.
    pub fn enable_lora(&mut self, models: &mut LoraModels<'_>) -> Result<()> {
        self.check_unfused("enable_lora")?;
        self.enabled = true;
        self.apply(models);
        Ok(())
    }

    /// Remove adapters; the remaining active ones stay applied.
    ///
    /// # Errors
    /// [`Error::UnknownName`] for a name not loaded, [`Error::InvalidArgument`] while fused.
    pub fn delete_adapters(
        &mut self,
        models: &mut LoraModels<'_>,
        adapter_names: &[&str],
    ) -> Result<()> {
        self.check_unfused("delete_adapters")?;
        for name in adapter_names {
            self.check_known(name)?;
        }
        for name in adapter_names {
            self.adapters.remove(*name);
        }
        self.order.retain(|n| self.adapters.contains_key(n));
        self.active.retain(|(n, _)| self.adapters.contains_key(n));
        self.apply(models);
        self.forget_untargeted_originals();
        Ok(())
    }

    /// Merge the active adapters (or only `adapter_names`) into the weights at `lora_scale`,
    /// as diffusers' `fuse_lora`: afterwards the runtime scale no longer applies, and
    /// [`Self::unload_lora_weights`] keeps the fused weights.
    ///
    /// # Errors
    /// [`Error::UnknownName`] for a name not loaded, [`Error::InvalidArgument`] when already
    /// fused.
    pub fn fuse_lora(
        &mut self,
        models: &mut LoraModels<'_>,
        lora_scale: f32,
        adapter_names: Option<&[&str]>,
    ) -> Result<()> {
        self.check_unfused("fuse_lora")?;
        if let Some(names) = adapter_names {
            for name in names {
                self.check_known(name)?;
            }
        }
        let fused = self
            .active
            .iter()
            .filter(|(n, _)| adapter_names.is_none_or(|names| names.contains(&n.as_str())))
            .cloned()
            .collect();
        self.fused = Some((fused, lora_scale));
        self.apply(models);
        Ok(())
    }

    /// Undo [`Self::fuse_lora`]: back to the active adapters at the runtime scale. Does
    /// nothing when not fused.
    pub fn unfuse_lora(&mut self, models: &mut LoraModels<'_>) -> Result<()> {
        if self.fused.take().is_some() {
            self.apply(models);
        }
        Ok(())
    }

    /// Whether [`Self::fuse_lora`] is in effect.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// Remove every adapter. Unfused, the models get their original weights back exactly (the
    /// kept tensors, not a subtraction); fused, the fused weights become the models' weights.
    pub fn unload_lora_weights(&mut self, models: &mut LoraModels<'_>) -> Result<()> {
        if self.fused.is_none() {
            self.adapters.clear();
            self.apply(models);
        }
        *self = Self::new();
        Ok(())
    }

    /// Names of the active adapters (diffusers' `get_active_adapters`).
    pub fn get_active_adapters(&self) -> Vec<&str> {
        if !self.enabled {
            return Vec::new();
        }
        self.active.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Per component, the adapters that adapt it, in load order (diffusers'
    /// `get_list_adapters`).
    pub fn get_list_adapters(&self) -> BTreeMap<LoraComponent, Vec<&str>> {
        let mut list: BTreeMap<LoraComponent, Vec<&str>> = BTreeMap::new();
        for name in &self.order {
            for component in self.adapters[name].layers.keys() {
                list.entry(*component).or_default().push(name);
            }
        }
        list
    }

    /// Write adapter `adapter_name` as a PEFT-format safetensors file (`path`, or
    /// [`LORA_WEIGHT_NAME_SAFE`] inside `path` when it is a folder), as diffusers'
    /// `save_lora_weights` does (`unet.<module>.lora_A.weight`, `lora_adapter_metadata` with
    /// `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern` and `target_modules`).
    ///
    /// # Errors
    /// [`Error::UnknownName`] for a name not loaded, I/O errors.
    pub fn save_lora_weights(&self, path: impl AsRef<Path>, adapter_name: &str) -> Result<()> {
        self.check_known(adapter_name)?;
        save::write_peft(&resolve_file(path.as_ref()), &self.adapters[adapter_name])
    }

    fn check_known(&self, name: &str) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Ok(());
        }
        Err(Error::UnknownName {
            kind: "LoRA adapter",
            name: name.to_string(),
            known: self.order.join(", "),
        })
    }

    fn check_unfused(&self, what: &str) -> Result<()> {
        if self.fused.is_some() {
            return Err(lora_error(format!(
                "{what} while LoRA is fused: call unfuse_lora first"
            )));
        }
        Ok(())
    }

    /// The adapters the weights should carry now, and the factor on all of them.
    fn coefficients(&self) -> (Vec<(String, ResolvedWeights)>, f32) {
        if let Some(fused) = &self.fused {
            return fused.clone();
        }
        if !self.enabled {
            return (Vec::new(), 0.0);
        }
        (self.active.clone(), self.scale)
    }

    /// Rewrite every targeted parameter from its original and the current coefficients.
    fn apply(&mut self, models: &mut LoraModels<'_>) {
        let (active, factor) = self.coefficients();
        for component in LoraComponent::ALL {
            if !models.has(component) {
                continue;
            }
            let originals = self.originals.entry(component).or_default();
            let mut targets: BTreeMap<String, Option<Tensor<2>>> =
                originals.keys().map(|k| (k.clone(), None)).collect();
            for adapter in self.adapters.values() {
                for (module, layer) in adapter.layers.get(&component).into_iter().flatten() {
                    targets.entry(format!("{module}.weight")).or_insert(None);
                    if layer.up_bias.is_some() {
                        targets.entry(format!("{module}.bias")).or_insert(None);
                    }
                }
            }
            for (name, weights) in &active {
                let Some(layers) = self
                    .adapters
                    .get(name)
                    .and_then(|a| a.layers.get(&component))
                else {
                    continue;
                };
                for (module, layer) in layers {
                    let c = weights.module_weight(component, module) * factor * layer.scale;
                    if c == 0.0 {
                        continue;
                    }
                    let delta = layer.up.clone().mul_scalar(c).matmul(layer.down.clone());
                    add_delta(&mut targets, format!("{module}.weight"), delta);
                    if let Some(bias) = &layer.up_bias {
                        add_delta(
                            &mut targets,
                            format!("{module}.bias"),
                            bias.clone().mul_scalar(c),
                        );
                    }
                }
            }
            if targets.is_empty() {
                continue;
            }
            let mut merger = Merger {
                targets: &targets,
                originals,
            };
            models.merge(component, &mut merger);
        }
        if self.adapters.is_empty() && self.fused.is_none() {
            self.originals.clear();
        }
    }

    fn forget_untargeted_originals(&mut self) {
        for (component, originals) in &mut self.originals {
            originals.retain(|key, _| {
                self.adapters.values().any(|a| {
                    a.layers.get(component).is_some_and(|layers| {
                        layers.keys().any(|m| {
                            key.strip_prefix(m.as_str())
                                .is_some_and(|rest| rest == ".weight" || rest == ".bias")
                        })
                    })
                })
            });
        }
    }
}

fn add_delta(targets: &mut BTreeMap<String, Option<Tensor<2>>>, key: String, delta: Tensor<2>) {
    let slot = targets.entry(key).or_insert(None);
    *slot = Some(match slot.take() {
        Some(sum) => sum + delta,
        None => delta,
    });
}

/// diffusers' LoRA file name inside a folder (`LORA_WEIGHT_NAME_SAFE`).
///
/// ```
/// use diffusion_loaders::lora::LORA_WEIGHT_NAME_SAFE;
/// assert_eq!(LORA_WEIGHT_NAME_SAFE, "pytorch_lora_weights.safetensors");
/// ```
pub const LORA_WEIGHT_NAME_SAFE: &str = "pytorch_lora_weights.safetensors";

/// A folder stands for its [`LORA_WEIGHT_NAME_SAFE`].
fn resolve_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(LORA_WEIGHT_NAME_SAFE)
    } else {
        path.to_path_buf()
    }
}
