//! Sharded and variant folders, saving, lenient loading and legacy key names.

use anyhow::Result;
use diffusion_core::Error;
use diffusion_core::weights::{Dtype, SaveDtype, WeightSource, resolve_weights};
use diffusion_models::ModelMixin;
use diffusion_models::UNet2DModel;
use diffusion_models::modeling_utils::PretrainedOptions;
use diffusion_models::state_dict::{LoadMode, param_shapes, state_dict};

use crate::{Io, TOLERANCE, device, fixture, max_abs_diff, read_all, values, write_model};

fn fp16_options() -> PretrainedOptions {
    PretrainedOptions {
        variant: Some("fp16".into()),
        ..Default::default()
    }
}

#[test]
fn sharded_and_fp16_variant_give_the_same_parameters_and_output() -> Result<()> {
    let sharded_dir = fixture("sharded");
    let index = resolve_weights(&sharded_dir, None)?;
    assert!(index.ends_with("diffusion_pytorch_model.safetensors.index.json"));
    assert!(
        WeightSource::open(&index)?.files().len() > 1,
        "the fixture must really be sharded"
    );

    let variant_dir = fixture("variant_fp16");
    let variant_file = resolve_weights(&variant_dir, Some("fp16"))?;
    assert!(variant_file.ends_with("diffusion_pytorch_model.fp16.safetensors"));
    let source = WeightSource::open(&variant_file)?;
    assert!(
        source
            .keys()
            .all(|k| source.entry(k).map(|e| e.dtype) == Some(Dtype::F16))
    );

    let sharded = UNet2DModel::from_pretrained(&sharded_dir, &device())?;
    let (half, report) =
        UNet2DModel::from_pretrained_with(&variant_dir, &fp16_options(), &device())?;
    assert!(report.is_exact());
    let (a, b) = (state_dict(&sharded), state_dict(&half));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.key, y.key);
        assert_eq!(x.shape, y.shape, "{}", x.key);
        assert_eq!(x.values, y.values, "{}", x.key);
    }

    let io = Io::open("sharded")?;
    let want = values(io.tensor::<4>("per_batch/out")?);
    for model in [&sharded, &half] {
        let out = model.forward(
            io.tensor::<4>("sample")?,
            io.tensor::<1>("per_batch/timestep")?,
            None,
        )?;
        let diff = max_abs_diff(&values(out), &want);
        assert!(diff <= TOLERANCE, "{diff:e}");
    }
    Ok(())
}

#[test]
fn variant_only_folder_needs_the_variant() {
    let dir = fixture("variant_fp16");
    match UNet2DModel::from_pretrained(&dir, &device()) {
        Err(Error::NotFound { path, message }) => {
            assert_eq!(path, dir);
            assert!(
                message.contains("diffusion_pytorch_model.safetensors"),
                "{message}"
            );
            assert!(
                message.contains("diffusion_pytorch_model.fp16.safetensors"),
                "{message}"
            );
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[test]
fn save_pretrained_round_trips_in_diffusers_format() -> Result<()> {
    let model = UNet2DModel::from_pretrained(fixture("ddpm_tiny"), &device())?;
    let dir = tempfile::tempdir()?;
    model.save_pretrained(dir.path())?;
    model.save_pretrained_with(dir.path(), Some("fp16"), SaveDtype::F16)?;

    // Same keys and shapes as the file diffusers wrote.
    let original =
        WeightSource::open(fixture("ddpm_tiny").join("diffusion_pytorch_model.safetensors"))?;
    let saved = WeightSource::open(dir.path().join("diffusion_pytorch_model.safetensors"))?;
    assert_eq!(
        original.keys().collect::<Vec<_>>(),
        saved.keys().collect::<Vec<_>>()
    );
    for key in original.keys() {
        assert_eq!(original.entry(key), saved.entry(key), "{key}");
        assert_eq!(original.read_f32(key)?.0, saved.read_f32(key)?.0, "{key}");
    }
    assert_eq!(
        saved.files()[0]
            .user_metadata()
            .map(|m| m["format"].as_str()),
        Some("pt")
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    assert_eq!(config["_class_name"], "UNet2DModel");

    let reloaded = UNet2DModel::from_pretrained(dir.path(), &device())?;
    assert_eq!(state_dict(&reloaded), state_dict(&model));
    let (half, _) = UNet2DModel::from_pretrained_with(dir.path(), &fp16_options(), &device())?;
    let max = state_dict(&half)
        .iter()
        .zip(state_dict(&model))
        .map(|(h, f)| max_abs_diff(&h.values, &f.values))
        .fold(0.0, f32::max);
    assert!(
        max > 0.0 && max < 1e-2,
        "fp16 rounding should be small but present: {max}"
    );
    Ok(())
}

#[test]
fn model_keys_equal_the_diffusers_state_dict() -> Result<()> {
    for case in [
        "ddpm_tiny",
        "class_scale_shift",
        "resnet_updown",
        "ncsnpp_skip",
        "learned_identity",
    ] {
        let config = diffusion_models::modeling_utils::load_config::<
            diffusion_models::UNet2DModelConfig,
        >(&fixture(case))?
        .0;
        let model = UNet2DModel::new(&config.config, &device())?;
        let source = WeightSource::open(fixture(case).join("diffusion_pytorch_model.safetensors"))?;
        let ours = param_shapes(&model);
        let theirs: std::collections::BTreeMap<String, Vec<usize>> = source
            .keys()
            .map(|k| {
                (
                    k.to_string(),
                    source.entry(k).map(|e| e.shape).unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(ours, theirs, "{case}");
    }
    Ok(())
}

#[test]
fn lenient_loading_reports_instead_of_failing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = read_all(&fixture("ddpm_tiny").join("diffusion_pytorch_model.safetensors"))?;
    tensors.retain(|t| t.key != "conv_in.bias");
    tensors.push(diffusion_core::weights::NamedTensor {
        key: "extra.weight".into(),
        shape: vec![2],
        values: vec![1.0, 2.0],
    });
    write_model("ddpm_tiny", dir.path(), &tensors)?;
    let options = PretrainedOptions {
        mode: LoadMode::Lenient,
        ..Default::default()
    };
    let (_, report) = UNet2DModel::from_pretrained_with(dir.path(), &options, &device())?;
    assert_eq!(report.missing, ["conv_in.bias"]);
    assert_eq!(report.unexpected, ["extra.weight"]);
    assert_eq!(report.applied.len(), tensors.len() - 1);
    Ok(())
}

#[test]
fn legacy_attention_names_load() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = read_all(&fixture("ddpm_tiny").join("diffusion_pytorch_model.safetensors"))?;
    let mut renamed = 0;
    for t in &mut tensors {
        for (new, old) in [
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ] {
            if t.key.contains(new) {
                t.key = t.key.replace(new, old);
                renamed += 1;
            }
        }
    }
    assert!(renamed > 0);
    write_model("ddpm_tiny", dir.path(), &tensors)?;
    let legacy = UNet2DModel::from_pretrained(dir.path(), &device())?;
    let current = UNet2DModel::from_pretrained(fixture("ddpm_tiny"), &device())?;
    assert_eq!(state_dict(&legacy), state_dict(&current));
    Ok(())
}

/// Every float parameter's dtype, in module order.
fn param_dtypes<M: diffusion_core::burn::module::Module>(
    module: &M,
) -> Vec<diffusion_core::burn::tensor::DType> {
    use diffusion_core::burn::module::{ModuleVisitor, Param};
    use diffusion_core::burn::tensor::Tensor;
    struct Dtypes(Vec<diffusion_core::burn::tensor::DType>);
    impl ModuleVisitor for Dtypes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().dtype());
        }
    }
    let mut visitor = Dtypes(Vec::new());
    module.visit(&mut visitor);
    visitor.0
}

/// `torch_dtype`: loading straight into f16 / bf16 (converted on the host, an f16 file's bytes
/// kept as they are) gives exactly the parameters of loading in f32 and casting, from an f32
/// file and from an fp16 variant, and the same output; lenient loading casts what it misses.
#[test]
fn loading_in_a_dtype_equals_loading_in_f32_and_casting() -> Result<()> {
    use diffusion_core::burn::tensor::{DType, FloatDType};
    use diffusion_models::modeling_utils::to_dtype;
    let io = Io::open("sharded")?;
    for (dtype, stored) in [
        (FloatDType::F16, DType::F16),
        (FloatDType::BF16, DType::BF16),
    ] {
        for (dir, variant) in [
            (fixture("sharded"), None),
            (fixture("variant_fp16"), Some("fp16")),
        ] {
            let options = PretrainedOptions {
                variant: variant.map(String::from),
                ..Default::default()
            };
            let (cast, _) = UNet2DModel::from_pretrained_with(&dir, &options, &device())?;
            let cast = to_dtype(cast, dtype)?;
            let direct_options = PretrainedOptions {
                dtype: Some(dtype),
                ..options
            };
            let (direct, report) =
                UNet2DModel::from_pretrained_with(&dir, &direct_options, &device())?;
            assert!(report.is_exact());
            let dtypes = param_dtypes(&direct);
            assert!(!dtypes.is_empty() && dtypes.iter().all(|d| *d == stored));
            for (x, y) in state_dict(&cast).iter().zip(&state_dict(&direct)) {
                assert_eq!(x.key, y.key);
                assert_eq!(x.values, y.values, "{dtype:?} {}: {}", dir.display(), x.key);
            }
            let run = |model: &UNet2DModel| -> Result<Vec<f32>> {
                let out = model.forward(
                    io.tensor::<4>("sample")?.cast(dtype),
                    io.tensor::<1>("per_batch/timestep")?,
                    None,
                )?;
                Ok(values(out.cast(FloatDType::F32)))
            };
            assert_eq!(run(&cast)?, run(&direct)?, "{dtype:?} {}", dir.display());
        }
    }

    let tmp = tempfile::tempdir()?;
    let mut tensors = read_all(&fixture("ddpm_tiny").join("diffusion_pytorch_model.safetensors"))?;
    tensors.retain(|t| t.key != "conv_in.bias");
    write_model("ddpm_tiny", tmp.path(), &tensors)?;
    let options = PretrainedOptions {
        mode: LoadMode::Lenient,
        dtype: Some(FloatDType::F16),
        ..Default::default()
    };
    let (model, report) = UNet2DModel::from_pretrained_with(tmp.path(), &options, &device())?;
    assert_eq!(report.missing, ["conv_in.bias"]);
    assert!(param_dtypes(&model).iter().all(|d| *d == DType::F16));
    Ok(())
}
