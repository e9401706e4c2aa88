//! `load_textual_inversion` against diffusers on the tiny pipelines of fixtures/pipelines/sd
//! (fixtures/oracle/gen_textual_inversion.py): converted prompts, token ids, `encode_prompt`
//! embeddings, a 2-step run, and the typed errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::tensor::from_vec;
use diffusion_core::{Device, Error};
use diffusion_loaders::textual_inversion::{
    TextualInversion, TextualInversionLayout, maybe_convert_prompt,
};
use diffusion_models::{CLIPTextModel, CLIPTokenizer, Padding};
use diffusion_pipelines::{
    StableDiffusionArgs, StableDiffusionComponents, StableDiffusionPipeline, StableDiffusionXLArgs,
    StableDiffusionXLComponents, StableDiffusionXLPipeline,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// `encode_prompt` embeddings: the same f32 CLIP on both sides.
const EMBEDS_TOL: f32 = 1e-4;
/// Images after two denoising steps and the VAE.
const IMAGE_TOL: f32 = 1e-3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ti(name: &str) -> PathBuf {
    fixtures().join("loaders/textual_inversion").join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn read_f32(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

fn sd1(device: &Device) -> StableDiffusionComponents {
    let dir = fixtures().join("pipelines/sd/sd1");
    StableDiffusionComponents::from_pretrained(dir.to_str().unwrap(), device).unwrap()
}

/// sd1 with the four single-table files loaded in the oracle's order.
fn sd1_with_embeddings(device: &Device) -> StableDiffusionComponents {
    let mut c = sd1(device);
    let loaded = [
        ("cat_toy.safetensors", vec!["<cat-toy>"]),
        (
            "multi.safetensors",
            vec!["<multi>", "<multi>_1", "<multi>_2"],
        ),
        (
            "a1111-style.safetensors",
            vec!["a1111-style", "a1111-style_1"],
        ),
        ("bin_tok.bin", vec!["<bin-tok>"]),
    ];
    for (file, tokens) in loaded {
        assert_eq!(c.load_textual_inversion(ti(file), None).unwrap(), tokens);
    }
    c
}

/// What `encode_prompt` does for one prompt: convert, tokenize to 77, last hidden state.
fn embed(
    tokenizer: &CLIPTokenizer,
    encoder: &CLIPTextModel,
    prompt: &str,
    device: &Device,
) -> Vec<f32> {
    let converted = maybe_convert_prompt(prompt, tokenizer).unwrap();
    let tokens = tokenizer
        .tokenize(&[converted], Padding::MaxLength, Some(77), true)
        .unwrap();
    let out = encoder
        .forward(tokens.input_ids_tensor(device).unwrap())
        .unwrap();
    out.last_hidden_state
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
fn files_are_read_in_every_layout() {
    let layouts = [
        (
            "cat_toy.safetensors",
            TextualInversionLayout::Diffusers,
            Some("<cat-toy>"),
            1,
        ),
        (
            "multi.safetensors",
            TextualInversionLayout::Diffusers,
            Some("<multi>"),
            3,
        ),
        (
            "a1111-style.safetensors",
            TextualInversionLayout::A1111,
            None,
            2,
        ),
        (
            "bin_tok.bin",
            TextualInversionLayout::Diffusers,
            Some("<bin-tok>"),
            1,
        ),
    ];
    for (file, layout, token, n) in layouts {
        let f = TextualInversion::open(ti(file)).unwrap();
        assert_eq!(f.layout(), layout, "{file}");
        assert_eq!(f.token(), token, "{file}");
        assert_eq!(f.single_table().unwrap().num_vectors, n, "{file}");
        assert_eq!(f.single_table().unwrap().dim, 8, "{file}");
    }
    // A1111's own `.pt` (vectors nested under `string_to_param`, an integer
    // `string_to_token` beside them) reads as the same A1111 table as its `.safetensors`.
    let pt = TextualInversion::open(ti("a1111-style.pt")).unwrap();
    let st = TextualInversion::open(ti("a1111-style.safetensors")).unwrap();
    assert_eq!(pt.layout(), TextualInversionLayout::A1111);
    assert_eq!(pt.token_or(None), "a1111-style");
    assert_eq!(pt.single_table().unwrap(), st.single_table().unwrap());
    let a1111 = TextualInversion::open(ti("a1111-style.safetensors")).unwrap();
    assert_eq!(a1111.token_or(None), "a1111-style");
    assert_eq!(a1111.token_or(Some("<x>")), "<x>");
    let xl = TextualInversion::open(ti("sdxl-style.safetensors")).unwrap();
    assert_eq!(xl.layout(), TextualInversionLayout::Sdxl);
    let (l, g) = xl.sdxl_tables().unwrap();
    assert_eq!((l.key.as_str(), g.key.as_str()), ("clip_l", "clip_g"));
    assert_eq!((l.num_vectors, g.num_vectors), (2, 2));

    // A folder is searched for diffusers' file name.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        ti("multi.safetensors"),
        dir.path().join("learned_embeds.safetensors"),
    )
    .unwrap();
    let f = TextualInversion::open(dir.path()).unwrap();
    assert_eq!(f.token(), Some("<multi>"));
    assert!(f.path().ends_with("learned_embeds.safetensors"));
}

#[test]
fn sd1_prompt_ids_and_embeddings_match_diffusers() {
    let device = Device::default();
    let c = sd1_with_embeddings(&device);
    let expected = read_json(&ti("sd1.json"));
    let tensors = read_f32(&ti("sd1.safetensors"));
    assert_eq!(
        c.tokenizer.vocab_size() as u64,
        expected["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        c.text_encoder.config().vocab_size as u64,
        expected["token_embedding_rows"].as_u64().unwrap()
    );
    let negative = expected["negative_prompt"].as_str().unwrap();
    assert_eq!(
        maybe_convert_prompt(negative, &c.tokenizer).unwrap(),
        expected["negative_converted"].as_str().unwrap()
    );
    let negative_embeds = embed(&c.tokenizer, &c.text_encoder, negative, &device);
    let mut worst = 0f32;
    for (i, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let converted = maybe_convert_prompt(prompt, &c.tokenizer).unwrap();
        assert_eq!(converted, case["converted"].as_str().unwrap(), "{prompt}");
        let tokens = c
            .tokenizer
            .tokenize(&[converted], Padding::MaxLength, Some(77), true)
            .unwrap();
        assert_eq!(tokens.input_ids[0], ids(&case["input_ids"]), "{prompt}");
        let got = embed(&c.tokenizer, &c.text_encoder, prompt, &device);
        let err = max_abs_diff(&got, &tensors[&format!("prompt{i}/prompt_embeds")].1);
        let neg_err = max_abs_diff(
            &negative_embeds,
            &tensors[&format!("prompt{i}/negative_prompt_embeds")].1,
        );
        assert!(
            err <= EMBEDS_TOL && neg_err <= EMBEDS_TOL,
            "{prompt}: {err} / {neg_err}"
        );
        worst = worst.max(err).max(neg_err);
    }
    eprintln!("sd1 encode_prompt max abs error {worst:e}");
}

#[test]
fn sd1_run_with_multi_vector_token_matches_diffusers() {
    let device = Device::default();
    let c = sd1_with_embeddings(&device);
    let expected = read_json(&ti("sd1.json"));
    let tensors = read_f32(&ti("sd1.safetensors"));
    let (shape, data) = &tensors["run/latents"];
    let latents = from_vec(data.clone(), shape.clone().try_into().unwrap(), &device);
    let out = StableDiffusionPipeline::from_parts(c)
        .call(StableDiffusionArgs {
            prompt: vec![expected["run"]["prompt"].as_str().unwrap().to_string()],
            negative_prompt: Some(vec![expected["negative_prompt"].as_str().unwrap().into()]),
            num_inference_steps: 2,
            latents: Some(latents),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    let ImageOutput::Array(images) = out.images else {
        panic!("expected an array")
    };
    let (want_shape, want) = &tensors["run/images"];
    assert_eq!(&images.shape, want_shape);
    let err = max_abs_diff(&images.data, want);
    eprintln!("sd1 2-step run max abs error {err:e}");
    assert!(err <= IMAGE_TOL, "{err}");
}

#[test]
fn sdxl_two_table_file_matches_diffusers() {
    let device = Device::default();
    let dir = fixtures().join("pipelines/sd/sdxl");
    let mut c =
        StableDiffusionXLComponents::from_pretrained(dir.to_str().unwrap(), &device).unwrap();
    let added = c
        .load_textual_inversion(ti("sdxl-style.safetensors"), None)
        .unwrap();
    assert_eq!(added, ["sdxl-style", "sdxl-style_1"]);
    let expected = read_json(&ti("sdxl.json"));
    let prompt = expected["prompt"].as_str().unwrap();
    for (name, tokenizer) in [
        ("tokenizer", c.tokenizer.as_ref().unwrap()),
        ("tokenizer_2", &c.tokenizer_2),
    ] {
        let want = &expected["tokenizers"][name];
        let converted = maybe_convert_prompt(prompt, tokenizer).unwrap();
        assert_eq!(converted, want["converted"].as_str().unwrap(), "{name}");
        let tokens = tokenizer
            .tokenize(&[converted], Padding::MaxLength, Some(77), true)
            .unwrap();
        assert_eq!(tokens.input_ids[0], ids(&want["input_ids"]), "{name}");
    }
    let tensors = read_f32(&ti("sdxl.safetensors"));
    let (shape, data) = &tensors["run/latents"];
    let latents = from_vec(data.clone(), shape.clone().try_into().unwrap(), &device);
    let out = StableDiffusionXLPipeline::from_parts(c)
        .call(StableDiffusionXLArgs {
            prompt: vec![prompt.to_string()],
            negative_prompt: Some(vec![expected["negative_prompt"].as_str().unwrap().into()]),
            num_inference_steps: 2,
            latents: Some(latents),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    let ImageOutput::Array(images) = out.images else {
        panic!("expected an array")
    };
    let (want_shape, want) = &tensors["run/images"];
    assert_eq!(&images.shape, want_shape);
    let err = max_abs_diff(&images.data, want);
    eprintln!("sdxl 2-step run max abs error {err:e}");
    assert!(err <= IMAGE_TOL, "{err}");
}

#[test]
fn bad_files_are_typed_errors_and_change_nothing() {
    let device = Device::default();
    let mut c = sd1(&device);
    c.load_textual_inversion(ti("cat_toy.safetensors"), None)
        .unwrap();
    let before = (c.tokenizer.vocab_size(), c.text_encoder.config().vocab_size);

    match c.load_textual_inversion(ti("multi.safetensors"), Some("<cat-toy>")) {
        Err(Error::TokenInVocabulary { token, .. }) => {
            assert_eq!(token, "<cat-toy>")
        }
        other => panic!("expected TokenInVocabulary, got {other:?}"),
    }
    // A word of the base vocabulary clashes too.
    assert!(matches!(
        c.load_textual_inversion(ti("multi.safetensors"), Some("<|endoftext|>")),
        Err(Error::TokenInVocabulary { .. })
    ));
    let err = c
        .load_textual_inversion(ti("bad_dim.safetensors"), None)
        .unwrap_err();
    match &err {
        Error::EmbeddingDim {
            path,
            table,
            expected,
            got,
        } => {
            assert!(path.ends_with("bad_dim.safetensors"));
            assert_eq!((table.as_str(), *expected, *got), ("<bad>", 8, 4));
        }
        other => panic!("expected EmbeddingDim, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("bad_dim.safetensors") && message.contains('4') && message.contains('8'),
        "{message}"
    );
    for file in ["unknown.safetensors", "sdxl-style.safetensors"] {
        match c.load_textual_inversion(ti(file), None) {
            Err(Error::UnknownEmbeddingLayout { path, .. }) => assert!(path.ends_with(file)),
            other => panic!("{file}: expected UnknownLayout, got {other:?}"),
        }
    }
    assert!(matches!(
        c.load_textual_inversion(ti("missing.safetensors"), None),
        Err(Error::NotFound { .. } | Error::Io { .. })
    ));
    assert_eq!(
        (c.tokenizer.vocab_size(), c.text_encoder.config().vocab_size),
        before
    );

    // SDXL: a single-table file is refused, and a clash on the second tokenizer leaves the
    // first untouched.
    let dir = fixtures().join("pipelines/sd/sdxl");
    let mut xl =
        StableDiffusionXLComponents::from_pretrained(dir.to_str().unwrap(), &device).unwrap();
    assert!(matches!(
        xl.load_textual_inversion(ti("multi.safetensors"), None),
        Err(Error::UnknownEmbeddingLayout { .. })
    ));
    xl.tokenizer_2.add_tokens(&["<taken>"]).unwrap();
    let first = xl.tokenizer.as_ref().unwrap().vocab_size();
    assert!(matches!(
        xl.load_textual_inversion(ti("sdxl-style.safetensors"), Some("<taken>")),
        Err(Error::TokenInVocabulary { .. })
    ));
    assert_eq!(xl.tokenizer.as_ref().unwrap().vocab_size(), first);
}

#[test]
fn vectors_are_written_in_the_model_dtype() {
    use diffusion_core::burn::tensor::{DType, FloatDType};
    let device = Device::default();
    let mut c = sd1(&device).to_dtype(FloatDType::F16).unwrap();
    c.load_textual_inversion(ti("multi.safetensors"), None)
        .unwrap();
    let weight = c
        .text_encoder
        .text_model
        .embeddings
        .token_embedding
        .weight
        .val();
    assert_eq!(weight.dtype(), DType::F16);
    assert_eq!(weight.dims(), [1003, 8]);
    let rows: Vec<f32> = weight
        .narrow(0, 1000, 3)
        .cast(FloatDType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let file = TextualInversion::open(ti("multi.safetensors")).unwrap();
    let values = file.single_table().unwrap().values.clone();
    let want: Vec<f32> = from_vec::<2>(values, [3, 8], &device)
        .cast(FloatDType::F16)
        .cast(FloatDType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(rows, want);
}

/// `unload_textual_inversion`: removing some tokens leaves exactly the state of loading only
/// the others (ids renumbered, their vectors kept); removing all restores the base model.
#[test]
fn unload_renumbers_the_rest_and_restores_the_base() {
    let device = Device::default();
    let prompt = "a <cat-toy> next to <bin-tok>, a1111-style";
    let mut c = sd1_with_embeddings(&device);
    let multi = ["<multi>", "<multi>_1", "<multi>_2"];
    let removed = c.unload_textual_inversion(Some(&multi)).unwrap();
    assert_eq!(removed.len(), 3);

    let mut only_rest = sd1(&device);
    for file in [
        "cat_toy.safetensors",
        "a1111-style.safetensors",
        "bin_tok.bin",
    ] {
        only_rest.load_textual_inversion(ti(file), None).unwrap();
    }
    for token in ["<cat-toy>", "a1111-style", "a1111-style_1", "<bin-tok>"] {
        assert_eq!(
            c.tokenizer.token_to_id(token),
            only_rest.tokenizer.token_to_id(token),
            "{token}"
        );
    }
    assert_eq!(c.tokenizer.token_to_id("<multi>"), None);
    assert_eq!(
        c.text_encoder.config().vocab_size,
        only_rest.text_encoder.config().vocab_size
    );
    let got = embed(&c.tokenizer, &c.text_encoder, prompt, &device);
    let want = embed(
        &only_rest.tokenizer,
        &only_rest.text_encoder,
        prompt,
        &device,
    );
    assert_eq!(max_abs_diff(&got, &want), 0.0);

    // A token that was never added: a typed error, nothing changes.
    let before = c.tokenizer.vocab_size();
    assert!(matches!(
        c.unload_textual_inversion(Some(&["<never-added>"])),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(c.tokenizer.vocab_size(), before);

    // Everything: the base tokenizer and embedding again.
    c.unload_textual_inversion(None).unwrap();
    let base = sd1(&device);
    assert_eq!(c.tokenizer.vocab_size(), base.tokenizer.vocab_size());
    assert_eq!(
        c.text_encoder.config().vocab_size,
        base.text_encoder.config().vocab_size
    );
    let plain = "a photo of a cat-toy";
    let got = embed(&c.tokenizer, &c.text_encoder, plain, &device);
    let want = embed(&base.tokenizer, &base.text_encoder, plain, &device);
    assert_eq!(max_abs_diff(&got, &want), 0.0);
}

#[test]
fn sdxl_unload_clears_both_encoders() {
    let device = Device::default();
    let dir = fixtures().join("pipelines/sd/sdxl");
    let base =
        StableDiffusionXLComponents::from_pretrained(dir.to_str().unwrap(), &device).unwrap();
    let mut c = base.clone();
    c.load_textual_inversion(ti("sdxl-style.safetensors"), None)
        .unwrap();
    c.unload_textual_inversion(None).unwrap();
    assert_eq!(c.tokenizer_2.vocab_size(), base.tokenizer_2.vocab_size());
    assert_eq!(
        c.tokenizer.as_ref().unwrap().vocab_size(),
        base.tokenizer.as_ref().unwrap().vocab_size()
    );
    assert_eq!(
        c.text_encoder_2.config().vocab_size,
        base.text_encoder_2.config().vocab_size
    );
}
