//! Loading and saving a burn module's parameters by diffusers state-dict key.
//!
//! Module attribute names equal diffusers' keys, so a parameter's key is its path in the module
//! tree (enum variants and `Option`s add nothing; `Vec` items add their index). Two layers store
//! parameters differently from PyTorch, and the mapping handles them:
//!
//! - `Linear`: burn stores `weight` as `[in, out]`, PyTorch as `[out, in]` (transposed here);
//! - `GroupNorm` / `LayerNorm`: burn names the affine parameters `gamma` / `beta`, PyTorch
//!   `weight` / `bias`.
//!
//! A `Conv2d` weight has PyTorch's shape `[out, in, kh, kw]`, but on CubeCL devices it is loaded
//! as a view of channels-last `[out, kh, kw, in]` memory, the layout burn's convolution reads
//! there without copying ([`kernels::ConvWeightLayout`]).
//!
//! The loader is a [`ModuleMapper`] rather than burn-store's `load_from`: it checks shapes in
//! PyTorch layout before reading any data (so errors name the stored key and the shape the file
//! should have), reads sharded checkpoints through one [`WeightSource`], converts f16 / bf16 /
//! f64 to f32 (or, with [`load_weights_as`], to the dtype the model will run in, on the host, so
//! no f32 copy reaches the device), and keeps parameters that are not loaded lazy.

use std::collections::BTreeMap;
use std::path::Path;

use diffusion_core::burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use diffusion_core::burn::tensor::{FloatDType, Tensor, TensorData};
use diffusion_core::kernels;
use diffusion_core::weights::{NamedTensor, SaveDtype, WeightSource, write_safetensors};
use diffusion_core::{Device, Error, Result};

/// Whether keys that do not match are errors or only reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadMode {
    /// A missing or unexpected tensor is an error (diffusers' default).
    #[default]
    Strict,
    /// Missing and unexpected tensors are listed in the [`LoadReport`]; missing parameters keep
    /// their initialisation. A mis-shaped tensor is still an error.
    Lenient,
}

/// What a load did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Keys that were loaded into a parameter.
    pub applied: Vec<String>,
    /// Parameter keys the source did not have.
    pub missing: Vec<String>,
    /// Source keys no parameter asked for.
    pub unexpected: Vec<String>,
}

impl LoadReport {
    /// Whether every parameter was loaded and every tensor used.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }
}

/// Tracks the module path during a traversal and turns it into a diffusers key.
#[derive(Default)]
struct KeyPath {
    segments: Vec<String>,
    containers: Vec<String>,
}

/// A parameter's diffusers key, whether its stored layout is the transpose of burn's, and
/// whether it is a convolution's weight.
struct ParamKey {
    key: String,
    transposed: bool,
    conv_weight: bool,
}

impl ParamKey {
    /// How the parameter is laid out in memory when loaded on `device`.
    fn layout(&self, device: &Device) -> Layout {
        if self.transposed {
            Layout::Transposed
        } else if self.conv_weight && kernels::conv_weights_channels_last(device) {
            Layout::ChannelsLast
        } else {
            Layout::Plain
        }
    }
}

/// How a loaded parameter's memory relates to its burn shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Contiguous in its own shape (PyTorch's, where the two agree).
    Plain,
    /// A `Linear` weight: burn's `[in, out]` is the transposed view of contiguous `[out, in]`
    /// memory, PyTorch's layout.
    Transposed,
    /// A convolution weight `[out, in, kh, kw]`, a view of contiguous channels-last
    /// `[out, kh, kw, in]` memory.
    ChannelsLast,
}

impl Layout {
    /// The axes that permute a parameter of rank `D` into its memory's order, where that is
    /// not the parameter's own.
    fn memory_axes<const D: usize>(self) -> Option<[usize; D]> {
        let axes: &[usize] = match self {
            Layout::Plain => return None,
            Layout::Transposed => &[1, 0],
            Layout::ChannelsLast => &[0, 2, 3, 1],
        };
        (axes.len() == D).then(|| std::array::from_fn(|k| axes[k]))
    }

    /// The inverse of [`Self::memory_axes`]: the axes that permute memory back to the parameter.
    fn param_axes<const D: usize>(self) -> Option<[usize; D]> {
        let axes = self.memory_axes::<D>()?;
        let mut back = [0; D];
        for (k, &axis) in axes.iter().enumerate() {
            back[axis] = k;
        }
        Some(back)
    }
}

impl KeyPath {
    fn enter(&mut self, name: &str, container: &str) {
        self.containers.push(container.to_string());
        if !container.starts_with("Enum:") {
            self.segments.push(name.to_string());
        }
    }

    fn exit(&mut self) {
        if let Some(container) = self.containers.pop()
            && !container.starts_with("Enum:")
        {
            self.segments.pop();
        }
    }

    /// The key of the parameter at the current path, which has rank `rank`.
    fn param_key(&self, rank: usize) -> ParamKey {
        let owner = self.containers.last().map(String::as_str).unwrap_or("");
        let mut segments = self.segments.clone();
        let mut transposed = false;
        let mut conv_weight = false;
        if let Some(last) = segments.last_mut() {
            match (owner, last.as_str()) {
                ("Struct:GroupNorm" | "Struct:LayerNorm", "gamma") => *last = "weight".into(),
                ("Struct:GroupNorm" | "Struct:LayerNorm", "beta") => *last = "bias".into(),
                ("Struct:Linear", "weight") if rank == 2 => transposed = true,
                ("Struct:Conv2d", "weight") if rank == 4 => conv_weight = true,
                _ => {}
            }
        }
        ParamKey {
            key: segments.join("."),
            transposed,
            conv_weight,
        }
    }
}

fn stored_shape(shape: &[usize], transposed: bool) -> Vec<usize> {
    let mut dims = shape.to_vec();
    if transposed {
        dims.reverse();
    }
    dims
}

struct Loader<'a> {
    source: &'a WeightSource,
    /// The dtype the parameters are created in (f32 when `None`).
    dtype: Option<FloatDType>,
    path: KeyPath,
    applied: Vec<String>,
    missing: Vec<String>,
    errors: Vec<Error>,
}

/// `data` as a tensor of `shape` on `device`, allocated as burn allocates parameters
/// (`Param::from_data`): in the device's persistent memory rather than the pools activations
/// come and go from. It is uploaded flat and reshaped (a metadata change): CubeCL's CUDA
/// runtime pads every row of a tensor it allocates to a power-of-two alignment (up to 512
/// bytes), which more than doubles a 3×3 convolution's f16 weight (6-byte rows); one flat row
/// wastes at most 511 bytes a tensor.
pub(crate) fn upload<const D: usize>(
    data: TensorData,
    shape: [usize; D],
    device: &diffusion_core::Device,
) -> Tensor<D> {
    let (bytes, _, dtype) = data.into_parts();
    let flat = TensorData::from_bytes(bytes, [shape.iter().product::<usize>()], dtype);
    device.memory_persistent_allocations(flat, |flat| {
        Tensor::<1>::from_data(flat, device).reshape(shape)
    })
}

/// `tensor` cast to `dtype` into a flat persistent allocation (see [`upload`]), reshaped back,
/// its memory in `layout`: a `Linear` weight is again the transposed view of a contiguous
/// `[out, in]` tensor and a channels-last convolution weight a view of `[out, kh, kw, in]`
/// memory, as loaded ones are.
pub(crate) fn cast_compact<const D: usize>(
    tensor: Tensor<D>,
    dtype: FloatDType,
    layout: Layout,
) -> Tensor<D> {
    let device = tensor.device();
    device.memory_persistent_allocations(tensor, |tensor| {
        through_memory_flat(tensor, layout, |flat| flat.cast(dtype))
    })
}

/// `tensor` flattened in the order of its memory in `layout`, passed through `f`, and shaped
/// back. The flattening reshape copies a tensor that is not contiguous in that order and is a
/// view of one that is; what `f` returns is contiguous, so the result is laid out as a loaded
/// parameter is.
fn through_memory_flat<const D: usize>(
    tensor: Tensor<D>,
    layout: Layout,
    f: impl FnOnce(Tensor<1>) -> Tensor<1>,
) -> Tensor<D> {
    let dims = tensor.dims();
    let count = dims.iter().product::<usize>();
    match layout.memory_axes::<D>().zip(layout.param_axes::<D>()) {
        Some((axes, back)) => {
            let memory = tensor.permute(axes);
            let memory_dims = memory.dims();
            f(memory.reshape([count]))
                .reshape(memory_dims)
                .permute(back)
        }
        None => f(tensor.reshape([count])).reshape(dims),
    }
}

/// Host data of a `[out, in, kh, kw]` tensor (`shape`) reordered to `[out, kh, kw, in]`.
fn channels_last_data(data: TensorData, shape: &[usize]) -> TensorData {
    let &[out, inp, kh, kw] = shape else {
        unreachable!("a convolution weight has rank 4, not {}", shape.len())
    };
    fn reorder<const N: usize>(src: &[u8], out: usize, inp: usize, taps: usize) -> Vec<u8> {
        let src: Vec<[u8; N]> = src
            .chunks_exact(N)
            .map(|c| c.try_into().expect("N bytes"))
            .collect();
        let mut dst = Vec::with_capacity(src.len() * N);
        for o in 0..out {
            let filter = &src[o * inp * taps..(o + 1) * inp * taps];
            for t in 0..taps {
                for i in 0..inp {
                    dst.extend_from_slice(&filter[i * taps + t]);
                }
            }
        }
        dst
    }
    let dtype = data.dtype();
    let bytes = data.as_bytes();
    let taps = kh * kw;
    // The loader reads f32, f16 or bf16.
    let reordered = match dtype.size() {
        2 => reorder::<2>(bytes, out, inp, taps),
        4 => reorder::<4>(bytes, out, inp, taps),
        size => unreachable!("parameters are read as 2- or 4-byte floats, not {size}"),
    };
    TensorData::from_bytes_vec(reordered, [out, kh, kw, inp], dtype)
}

impl Loader<'_> {
    /// The stored tensor as host data: in the loader's dtype when the host can convert to it
    /// (f32, f16, bf16), else f32 (cast on the device afterwards).
    fn read(&self, key: &str) -> Result<TensorData> {
        match self.dtype {
            Some(dtype @ (FloatDType::F16 | FloatDType::BF16 | FloatDType::F32)) => {
                self.source.read_data(key, dtype)
            }
            _ => self.source.read_data(key, FloatDType::F32),
        }
    }

    fn load<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let param_key = self.path.param_key(D);
        let device = param.lazy_device();
        let layout = param_key.layout(&device);
        let ParamKey {
            key, transposed, ..
        } = param_key;
        let Some(entry) = self.source.entry(&key) else {
            self.missing.push(key);
            return param;
        };
        let expected = stored_shape(&param.lazy_shape().to_vec(), transposed);
        if entry.shape != expected {
            let path = self.source.file_of(&key).unwrap_or(self.source.origin());
            self.errors.push(Error::TensorShape {
                path: path.to_path_buf(),
                key,
                expected,
                got: entry.shape,
            });
            return param;
        }
        let data = match self.read(&key) {
            Ok(data) => data,
            Err(e) => {
                self.errors.push(e);
                return param;
            }
        };
        let stored: [usize; D] = expected.try_into().expect("the stored shape has rank D");
        // Uploaded as laid out in memory: the stored (PyTorch) layout, or for a channels-last
        // convolution weight the data reordered on the host, then viewed in burn's shape.
        let mut tensor = match (layout, layout.memory_axes::<D>()) {
            (Layout::ChannelsLast, Some(axes)) => {
                let memory = std::array::from_fn(|k| stored[axes[k]]);
                upload::<D>(channels_last_data(data, &stored), memory, &device)
            }
            _ => upload::<D>(data, stored, &device),
        };
        if let Some(dtype) = self.dtype
            && FloatDType::from(tensor.dtype()) != dtype
        {
            tensor = cast_compact(tensor, dtype, Layout::Plain);
        }
        tensor = match (layout, layout.param_axes::<D>()) {
            (Layout::Transposed, _) => tensor.transpose(),
            (Layout::ChannelsLast, Some(back)) => tensor.permute(back),
            _ => tensor,
        };
        self.applied.push(key);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        self.load(param)
    }
}

/// Set every float parameter of `module` from `source` by diffusers key.
///
/// # Errors
/// In both modes: [`Error::TensorShape`] naming the key and the file that stores it when a
/// tensor's shape differs from the parameter's (PyTorch layout), [`Error::TensorDtype`] for a
/// non-float tensor, and I/O errors from reading. In [`LoadMode::Strict`] also
/// [`Error::MissingTensor`] naming the first missing key and [`Error::UnexpectedTensors`]
/// listing the unused keys, both with the source's origin (file or index) as path.
pub fn load_weights<M: Module>(
    module: M,
    source: &WeightSource,
    mode: LoadMode,
) -> Result<(M, LoadReport)> {
    load_weights_as(module, source, mode, None)
}

/// [`load_weights`] into parameters of `dtype` (diffusers' `torch_dtype`): each tensor is
/// converted on the host (an f16 file read as f16 keeps its bytes), so the device never holds
/// the f32 weights that loading and then casting ([`crate::modeling_utils::to_dtype`]) goes
/// through. Parameters the source lacks (lenient mode) are cast too, so the whole module is in
/// `dtype`. The values equal loading in f32 and casting. `None` loads in f32.
///
/// # Errors
/// As [`load_weights`]; [`Error::InvalidArgument`] (`dtype`) when the module's device does not
/// support `dtype`.
pub fn load_weights_as<M: Module>(
    module: M,
    source: &WeightSource,
    mode: LoadMode,
    dtype: Option<FloatDType>,
) -> Result<(M, LoadReport)> {
    if let Some(dtype) = dtype {
        crate::modeling_utils::check_dtype_support(&module, dtype)?;
    }
    let mut loader = Loader {
        source,
        dtype,
        path: KeyPath::default(),
        applied: Vec::new(),
        missing: Vec::new(),
        errors: Vec::new(),
    };
    let module = module.map(&mut loader);
    if let Some(err) = loader.errors.into_iter().next() {
        return Err(err);
    }
    let applied: std::collections::BTreeSet<&str> =
        loader.applied.iter().map(String::as_str).collect();
    let unexpected: Vec<String> = source
        .keys()
        .filter(|k| !applied.contains(k))
        .map(str::to_string)
        .collect();
    if mode == LoadMode::Strict {
        if let Some(key) = loader.missing.first() {
            return Err(Error::MissingTensor {
                path: source.origin().to_path_buf(),
                key: key.clone(),
            });
        }
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedTensors {
                path: source.origin().to_path_buf(),
                keys: unexpected,
            });
        }
    }
    let module = match dtype {
        Some(dtype) if !loader.missing.is_empty() => {
            crate::modeling_utils::to_dtype(module, dtype)?
        }
        _ => module,
    };
    let report = LoadReport {
        applied: loader.applied,
        missing: loader.missing,
        unexpected,
    };
    Ok((module, report))
}

/// A visitor of a module's float parameters by diffusers state-dict key, for code outside this
/// crate that rewrites chosen parameters in place (LoRA merging in `diffusion-loaders`).
pub trait KeyedParamMapper {
    /// Return the parameter stored under `key` (PyTorch layout), changed or not. `transposed`
    /// is true where burn keeps the transpose of the stored layout (a `Linear` weight: burn
    /// `[in, out]`, PyTorch `[out, in]`).
    fn map_param<const D: usize>(
        &mut self,
        key: &str,
        transposed: bool,
        param: Param<Tensor<D>>,
    ) -> Param<Tensor<D>>;
}

/// [`KeyedParamMapper`] with the parameter's loaded [`Layout`] on its device, for this crate's
/// mappers that must keep it.
pub(crate) trait LayoutParamMapper {
    fn map_param<const D: usize>(
        &mut self,
        key: &str,
        layout: Layout,
        param: Param<Tensor<D>>,
    ) -> Param<Tensor<D>>;
}

/// A [`KeyedParamMapper`], which is told only whether a parameter is transposed. What it returns
/// for a channels-last convolution weight is laid out channels-last again (no copy where it
/// still is).
struct Public<'a, P>(&'a mut P);

impl<P: KeyedParamMapper> LayoutParamMapper for Public<'_, P> {
    fn map_param<const D: usize>(
        &mut self,
        key: &str,
        layout: Layout,
        param: Param<Tensor<D>>,
    ) -> Param<Tensor<D>> {
        let param = self.0.map_param(key, layout == Layout::Transposed, param);
        if layout == Layout::ChannelsLast {
            param.map(|tensor| through_memory_flat(tensor, layout, |flat| flat))
        } else {
            param
        }
    }
}

struct KeyedMapper<'a, P> {
    path: KeyPath,
    inner: &'a mut P,
}

impl<P: LayoutParamMapper> ModuleMapper for KeyedMapper<'_, P> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.param_key(D);
        let layout = key.layout(&param.lazy_device());
        self.inner.map_param(&key.key, layout, param)
    }
}

/// [`map_params_by_key`] for this crate's layout-aware mappers.
pub(crate) fn map_params_with_layout<M: Module, P: LayoutParamMapper>(
    module: M,
    mapper: &mut P,
) -> M {
    module.map(&mut KeyedMapper {
        path: KeyPath::default(),
        inner: mapper,
    })
}

/// Hand every float parameter of `module` to `mapper` with its diffusers key, and rebuild the
/// module from what it returns. A `Conv2d` weight it returns on a device where they are loaded
/// channels-last ([`kernels::ConvWeightLayout`]) is laid out so again: one copy for a new
/// tensor (a merged LoRA), none for one that kept its memory.
///
/// ```
/// use diffusion_core::Device;
/// use diffusion_core::burn::module::Param;
/// use diffusion_core::burn::nn::LinearConfig;
/// use diffusion_core::burn::tensor::Tensor;
/// use diffusion_models::state_dict::{KeyedParamMapper, map_params_by_key};
///
/// struct Zero(&'static str);
/// impl KeyedParamMapper for Zero {
///     fn map_param<const D: usize>(
///         &mut self,
///         key: &str,
///         _transposed: bool,
///         param: Param<Tensor<D>>,
///     ) -> Param<Tensor<D>> {
///         if key == self.0 { param.map(|t| t.zeros_like()) } else { param }
///     }
/// }
/// let linear = LinearConfig::new(2, 3).init(&Device::flex());
/// let linear = map_params_by_key(linear, &mut Zero("bias"));
/// let bias = linear.bias.as_ref().unwrap().val();
/// assert_eq!(diffusion_core::tensor::to_vec(bias), [0.0; 3]);
/// ```
pub fn map_params_by_key<M: Module, P: KeyedParamMapper>(module: M, mapper: &mut P) -> M {
    map_params_with_layout(module, &mut Public(mapper))
}

/// `module` with every float parameter laid out in memory as [`load_weights`] lays it out: a
/// contiguous tensor, except a `Linear` weight, which is the transposed view of a contiguous
/// PyTorch-layout `[out, in]` tensor, and, on CubeCL devices, a `Conv2d` weight, a view of
/// channels-last `[out, kh, kw, in]` memory ([`kernels::ConvWeightLayout`]). Parameters already
/// laid out so are kept without a copy.
///
/// Matrix products round differently for different operand layouts, so a module whose
/// parameters went another way (moved to the autodiff device and back, which makes each one
/// contiguous in burn's own layout; trained; merged with a LoRA) computes the same values as a
/// freshly loaded copy of the same weights only to the last bit or so. Training runs pass their
/// validation copies through this, so that a validation image is byte for byte the image made
/// from the saved weights. For inference copies: on an autodiff device the reshapes would be
/// recorded in the graph and the parameters would stop being leaves.
pub fn with_loaded_layout<M: Module>(module: M) -> M {
    map_params_with_layout(module, &mut LoadedLayout)
}

struct LoadedLayout;

impl LayoutParamMapper for LoadedLayout {
    fn map_param<const D: usize>(
        &mut self,
        _key: &str,
        layout: Layout,
        param: Param<Tensor<D>>,
    ) -> Param<Tensor<D>> {
        param.map(|tensor| through_memory_flat(tensor, layout, |flat| flat))
    }
}

struct Collector {
    path: KeyPath,
    shapes_only: bool,
    tensors: Vec<NamedTensor>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let ParamKey {
            key, transposed, ..
        } = self.path.param_key(D);
        let shape = stored_shape(&param.lazy_shape().to_vec(), transposed);
        let values = if self.shapes_only {
            Vec::new()
        } else {
            let mut tensor = param.val();
            if transposed {
                tensor = tensor.transpose();
            }
            diffusion_core::tensor::to_vec(tensor)
        };
        self.tensors.push(NamedTensor { key, shape, values });
    }
}

/// Every float parameter as a diffusers state dict (PyTorch layout), sorted by key.
pub fn state_dict<M: Module>(module: &M) -> Vec<NamedTensor> {
    let mut collector = Collector {
        path: KeyPath::default(),
        shapes_only: false,
        tensors: Vec::new(),
    };
    module.visit(&mut collector);
    collector.tensors.sort_by(|a, b| a.key.cmp(&b.key));
    collector.tensors
}

/// Every float parameter's key and shape in PyTorch layout, without initialising lazy
/// parameters.
pub fn param_shapes<M: Module>(module: &M) -> BTreeMap<String, Vec<usize>> {
    let mut collector = Collector {
        path: KeyPath::default(),
        shapes_only: true,
        tensors: Vec::new(),
    };
    module.visit(&mut collector);
    collector
        .tensors
        .into_iter()
        .map(|t| (t.key, t.shape))
        .collect()
}

/// Write `module`'s parameters as a diffusers safetensors file.
///
/// # Errors
/// As [`write_safetensors`].
pub fn save_weights<M: Module>(module: &M, path: impl AsRef<Path>, dtype: SaveDtype) -> Result<()> {
    write_safetensors(path, &state_dict(module), dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion_core::Device;
    use diffusion_core::burn;
    use diffusion_core::burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};

    #[derive(Module, Debug)]
    struct Inner {
        norm: GroupNorm,
        proj: Vec<Linear>,
    }

    #[derive(Module, Debug)]
    enum Choice {
        A(Linear),
    }

    #[derive(Module, Debug)]
    struct Toy {
        inner: Inner,
        choice: Choice,
        absent: Option<Linear>,
    }

    fn toy(device: &Device) -> Toy {
        Toy {
            inner: Inner {
                norm: GroupNormConfig::new(2, 4).init(device),
                proj: vec![LinearConfig::new(4, 3).init(device)],
            },
            choice: Choice::A(LinearConfig::new(2, 2).with_bias(false).init(device)),
            absent: None,
        }
    }

    fn seq(n: usize, offset: f32) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.5 + offset).collect()
    }

    fn write(dir: &Path, tensors: &[NamedTensor]) -> WeightSource {
        let path = dir.join("toy.safetensors");
        write_safetensors(&path, tensors, SaveDtype::F32).unwrap();
        WeightSource::open(&path).unwrap()
    }

    fn full() -> Vec<NamedTensor> {
        let t = |key: &str, shape: Vec<usize>, offset| NamedTensor {
            key: key.into(),
            values: seq(shape.iter().product(), offset),
            shape,
        };
        vec![
            t("inner.norm.weight", vec![4], 1.0),
            t("inner.norm.bias", vec![4], -1.0),
            t("inner.proj.0.weight", vec![3, 4], 0.0),
            t("inner.proj.0.bias", vec![3], 2.0),
            t("choice.weight", vec![2, 2], 3.0),
        ]
    }

    #[test]
    fn keys_follow_diffusers_names_and_layout() {
        let device = Device::flex();
        let shapes = param_shapes(&toy(&device));
        let expected: BTreeMap<String, Vec<usize>> =
            full().into_iter().map(|t| (t.key, t.shape)).collect();
        assert_eq!(shapes, expected);
    }

    #[test]
    fn load_transposes_linear_and_renames_norm_then_saves_back() {
        let device = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        let source = write(dir.path(), &full());
        let (model, report) = load_weights(toy(&device), &source, LoadMode::Strict).unwrap();
        assert!(report.is_exact());
        assert_eq!(report.applied.len(), 5);
        // burn's Linear weight is [in, out]: element [i, o] is PyTorch's [o, i].
        let w = diffusion_core::tensor::to_vec(model.inner.proj[0].weight.val());
        let torch = seq(12, 0.0);
        for o in 0..3 {
            for i in 0..4 {
                assert_eq!(w[i * 3 + o], torch[o * 4 + i]);
            }
        }
        let gamma = model.inner.norm.gamma.as_ref().unwrap().val();
        assert_eq!(diffusion_core::tensor::to_vec(gamma), seq(4, 1.0));
        assert_eq!(state_dict(&model), {
            let mut f = full();
            f.sort_by(|a, b| a.key.cmp(&b.key));
            f
        });
    }

    #[derive(Module, Debug)]
    struct Projections {
        proj: Vec<Linear>,
    }

    /// A module whose parameters were made contiguous in burn's layout (as moving to the
    /// autodiff device and back does) computes slightly different bits from a loaded copy of
    /// the same weights; after [`with_loaded_layout`] it computes the loaded copy's bits.
    #[test]
    fn loaded_layout_reproduces_a_loaded_copy_bit_for_bit() {
        let device = Device::flex();
        let mut state = 0x2545_f491_u32;
        let mut uniform = move || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let sizes = [(64, 48), (37, 29), (4, 16), (320, 40)];
        let mut tensors = Vec::new();
        for (i, &(d_in, d_out)) in sizes.iter().enumerate() {
            for (part, shape) in [("weight", vec![d_out, d_in]), ("bias", vec![d_out])] {
                let values = (0..shape.iter().product()).map(|_| uniform()).collect();
                tensors.push(NamedTensor {
                    key: format!("proj.{i}.{part}"),
                    shape,
                    values,
                });
            }
        }
        let fresh = || Projections {
            proj: sizes
                .iter()
                .map(|&(d_in, d_out)| LinearConfig::new(d_in, d_out).init(&device))
                .collect(),
        };
        let dir = tempfile::tempdir().unwrap();
        let source = write(dir.path(), &tensors);
        let (loaded, _) = load_weights(fresh(), &source, LoadMode::Strict).unwrap();
        // Every parameter rebuilt from its values: contiguous, burn's layout.
        struct Contiguous;
        impl ModuleMapper for Contiguous {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                param.map(|t| {
                    let device = t.device();
                    Tensor::from_data(t.into_data(), &device)
                })
            }
        }
        let rebuilt = loaded.clone().map(&mut Contiguous);
        let relaid = with_loaded_layout(rebuilt.clone());
        assert_eq!(state_dict(&rebuilt), state_dict(&loaded));
        assert_eq!(state_dict(&relaid), state_dict(&loaded));
        let forward = |m: &Projections, i: usize, x: &Tensor<2>| {
            diffusion_core::tensor::to_vec(m.proj[i].forward(x.clone()))
        };
        let mut layout_mattered = false;
        for (i, &(d_in, _)) in sizes.iter().enumerate() {
            let rows = 9;
            let x: Vec<f32> = (0..rows * d_in).map(|_| uniform()).collect();
            let x = Tensor::<2>::from_data(TensorData::new(x, [rows, d_in]), &device);
            let want = forward(&loaded, i, &x);
            layout_mattered |= forward(&rebuilt, i, &x) != want;
            assert_eq!(forward(&relaid, i, &x), want, "proj.{i}");
        }
        // Otherwise this test shows nothing: the matrix kernel rounds by layout.
        assert!(layout_mattered);
    }

    #[test]
    fn strict_errors_name_the_key() {
        let device = Device::flex();
        let dir = tempfile::tempdir().unwrap();

        let mut missing = full();
        missing.retain(|t| t.key != "inner.norm.bias");
        let source = write(dir.path(), &missing);
        match load_weights(toy(&device), &source, LoadMode::Strict) {
            Err(Error::MissingTensor { key, path }) => {
                assert_eq!(key, "inner.norm.bias");
                assert_eq!(path, source.origin());
            }
            other => panic!("{other:?}"),
        }
        let (_, report) = load_weights(toy(&device), &source, LoadMode::Lenient).unwrap();
        assert_eq!(report.missing, ["inner.norm.bias"]);
        assert!(report.unexpected.is_empty());

        let mut extra = full();
        extra.push(NamedTensor {
            key: "inner.proj.1.weight".into(),
            shape: vec![1],
            values: vec![0.0],
        });
        let source = write(dir.path(), &extra);
        match load_weights(toy(&device), &source, LoadMode::Strict) {
            Err(Error::UnexpectedTensors { keys, .. }) => assert_eq!(keys, ["inner.proj.1.weight"]),
            other => panic!("{other:?}"),
        }
        let (_, report) = load_weights(toy(&device), &source, LoadMode::Lenient).unwrap();
        assert_eq!(report.unexpected, ["inner.proj.1.weight"]);

        // A Linear weight stored in burn's layout instead of PyTorch's is a shape error that
        // reports the PyTorch shape expected.
        let mut wrong = full();
        wrong[2].shape = vec![4, 3];
        let source = write(dir.path(), &wrong);
        for mode in [LoadMode::Strict, LoadMode::Lenient] {
            match load_weights(toy(&device), &source, mode) {
                Err(Error::TensorShape {
                    key, expected, got, ..
                }) => {
                    assert_eq!(key, "inner.proj.0.weight");
                    assert_eq!(expected, [3, 4]);
                    assert_eq!(got, [4, 3]);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
