//! DPMSolverSDEScheduler and its torchsde Brownian tree against fixtures/oracle/
//! gen_schedulers_sde.py (fixtures/schedulers/sde/): numpy's SeedSequence, torchsde's
//! increments, whole trajectories, add_noise, diffusers' own test loops
//! (tests/schedulers/test_scheduler_dpm_sde.py), configs, names and bad input.

use anyhow::{Context, Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_core::burn::tensor::Tensor;
use diffusion_schedulers::brownian_tree::{BrownianInterval, SeedSequence};
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DPMSolverSDEScheduler, DPMSolverSDESchedulerConfig,
    PredictionType, Scheduler, SchedulerKind, SchedulerSpec, SetTimesteps, StepOptions,
};
use serde_json::Value;

use crate::common::{
    Tensors, arg_name, build, dummy_model, dummy_sample_deter, field_name, host, max_abs,
    read_json, rel_err, rel_err_scaled, tensor,
};
use crate::more::{check_golden, comparable, default_config_file_in, golden_in};

const CLASS: &str = "DPMSolverSDEScheduler";

fn big(v: &Value) -> Result<u128> {
    Ok(v.as_str().context("decimal string")?.parse()?)
}

#[test]
fn seed_sequence_matches_numpy() -> Result<()> {
    let cases = read_json("sde/seed_sequence.json")?;
    let cases = cases.as_array().context("cases")?;
    ensure!(cases.len() > 300, "only {} cases", cases.len());
    for case in cases {
        let keys = case["spawn_key"]
            .as_array()
            .context("spawn_key")?
            .iter()
            .map(big)
            .collect::<Result<Vec<_>>>()?;
        let pool = case["pool_size"].as_u64().context("pool_size")? as usize;
        let n = case["n_words"].as_u64().context("n_words")? as usize;
        let ours = SeedSequence::new(big(&case["entropy"])?, &keys, pool)?.generate_state(n);
        let theirs: Vec<u32> = serde_json::from_value(case["state"].clone())?;
        ensure!(ours == theirs, "{case}: ours {ours:?}");
    }
    Ok(())
}

#[test]
fn brownian_increments_match_torchsde() -> Result<()> {
    let cases = read_json("sde/brownian.json")?;
    let tensors = Tensors::load("sde/brownian.safetensors")?;
    let (mut worst, mut equal, mut total) = (0f64, 0usize, 0usize);
    for case in cases.as_array().context("cases")? {
        let id = case["id"].as_str().context("id")?;
        let size: Vec<usize> = serde_json::from_value(case["size"].clone())?;
        let (t0, t1) = (
            case["t0"].as_f64().context("t0")?,
            case["t1"].as_f64().context("t1")?,
        );
        let mut bm = BrownianInterval::diffusers(t0, t1, &size, big(&case["entropy"])?)?;
        // The same tree asked in the reverse order must give the same values (halfway tree).
        let mut reversed = bm.clone();
        let queries = case["queries"].as_array().context("queries")?;
        for (j, q) in queries.iter().enumerate() {
            let (ta, tb) = (q[0].as_f64().context("ta")?, q[1].as_f64().context("tb")?);
            let ours = bm.increment(ta, tb)?;
            let theirs = tensors.values(&format!("{id}/{j}"))?;
            ensure!(ours.len() == theirs.len(), "{id}/{j}: length");
            let err = ours
                .iter()
                .zip(theirs)
                .fold(0f64, |m, (a, b)| m.max(f64::from((a - b).abs())));
            // torch's AVX2 randn differs from TorchGenerator in the last bit of some elements;
            // a node's value is a sum of a few such draws scaled by at most sqrt(t1 - t0).
            let scale = (t1 - t0).sqrt().max(1.0);
            ensure!(
                err <= 2e-6 * scale,
                "{id} query {j} [{ta}, {tb}]: error {err:e}"
            );
            worst = worst.max(err / scale);
            equal += ours.iter().zip(theirs).filter(|(a, b)| a == b).count();
            total += ours.len();
            if let Ok(batched) = tensors.get(&format!("{id}/batched/{j}")) {
                // diffusers' wrapper built from reversed ends and asked reversed: sign +1.
                ensure!(batched.1 == theirs, "{id}/batched/{j}");
            }
        }
        for (j, q) in queries.iter().enumerate().rev() {
            let ours =
                reversed.increment(q[0].as_f64().unwrap_or(0.0), q[1].as_f64().unwrap_or(0.0))?;
            let theirs = tensors.values(&format!("{id}/{j}"))?;
            let err = ours
                .iter()
                .zip(theirs)
                .fold(0f64, |m, (a, b)| m.max(f64::from((a - b).abs())));
            ensure!(
                err <= 2e-6 * (t1 - t0).sqrt().max(1.0),
                "{id} reversed query {j}"
            );
        }
    }
    eprintln!(
        "  Brownian increments: worst error {worst:e} (scaled), {equal} of {total} values bit-equal"
    );
    ensure!(equal * 2 > total, "too few bit-equal values");
    Ok(())
}

#[test]
fn randint_matches_torch() -> Result<()> {
    for case in read_json("sde/randint.json")?.as_array().context("cases")? {
        let seed = case["seed"].as_u64().context("seed")?;
        let theirs: i64 = case["value"].as_str().context("value")?.parse()?;
        ensure!(TorchGenerator::new(seed).randint(0, i64::MAX)? == theirs);
    }
    Ok(())
}

/// Tolerances: sigmas a few float32 ulps (torch's MKL sqrt/log), samples 1e-5 relative.
const SIGMA_RTOL: f64 = 4.0 * f32::EPSILON as f64;
const SAMPLE_RTOL: f64 = 1e-5;

fn check_schedule(case: &Value, s: &DPMSolverSDEScheduler) -> Result<()> {
    let id = case["id"].as_str().context("id")?;
    let floats = |v: &Value| -> Vec<f64> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let ts = floats(&case["diffusers_timesteps"]);
    ensure!(s.timesteps().len() == ts.len(), "{id}: timestep count");
    for (a, b) in s.timesteps().iter().zip(&ts) {
        // Timesteps found from sigmas invert the log-sigma table in float64: a sigma off by
        // an ulp moves them by a few 1e-5.
        ensure!(
            (a - b).abs() <= 1e-4,
            "{id}: timesteps {:?} vs {ts:?}",
            s.timesteps()
        );
    }
    let sigmas = floats(&case["diffusers_sigmas"]);
    let ours = s.sigmas().context("sigmas")?;
    ensure!(ours.len() == sigmas.len(), "{id}: sigma count");
    for (a, b) in ours.iter().zip(&sigmas) {
        ensure!(
            (a - b).abs() <= SIGMA_RTOL * b.abs(),
            "{id}: sigmas {ours:?} vs {sigmas:?}"
        );
    }
    let init = case["init_noise_sigma"].as_f64().context("init")?;
    ensure!((s.init_noise_sigma() - init).abs() <= SIGMA_RTOL * init);
    Ok(())
}

/// The noise-sampler query of each step (`None` for the final Euler step), as the scheduler
/// computes it: float32 `exp(-t)` at both ends, `t = -ln(sigma)`, the first evaluation
/// querying up to the log-midpoint.
fn our_queries(sigmas: &[f64]) -> Vec<Option<(f32, f32)>> {
    let ln = |x: f32| f64::from(x).ln() as f32;
    let exp = |x: f32| f64::from(x).exp() as f32;
    let mut first = true;
    (0..sigmas.len() - 1)
        .map(|i| {
            let (sigma, next) = if first {
                (sigmas[i] as f32, sigmas[i + 1] as f32)
            } else {
                (sigmas[i - 1] as f32, sigmas[i] as f32)
            };
            if next == 0.0 {
                return None;
            }
            let (t, t_next) = (-ln(sigma), -ln(next));
            let to = if first {
                t + (t_next - t) * 0.5
            } else {
                t_next
            };
            first = !first;
            Some((exp(-t), exp(-to)))
        })
        .collect()
}

/// A query time as the Brownian tree sees it: rounded to 1e-6.
fn rounded(t: f32) -> String {
    format!("{:.6}", f64::from(t))
}

/// How one fixture trajectory went.
#[derive(Default)]
struct Outcome {
    worst: f64,
    steps: usize,
    /// Steps whose Brownian query lands on another 1e-6 grid point than diffusers' (see the
    /// scheduler's precision notes): their noise differs by design, so only their `x_0` is
    /// compared.
    moved: usize,
    closed_loop: bool,
}

/// One fixture trajectory, step by step (each step fed diffusers' previous sample), and closed
/// loop when every query agrees with diffusers' on the 1e-6 grid.
fn check_trajectory(case: &Value, tensors: &Tensors) -> Result<Outcome> {
    let id = case["id"].as_str().context("id")?;
    let mut outcome = Outcome::default();
    let theirs: Vec<(f32, f32)> = case["noise_queries"]
        .as_array()
        .context("noise_queries")?
        .iter()
        .map(|q| {
            (
                q[0].as_f64().unwrap_or(0.0) as f32,
                q[1].as_f64().unwrap_or(0.0) as f32,
            )
        })
        .collect();
    let mut moved = Vec::new();
    {
        let mut s = load_value(&case["config"])?;
        s.set_timesteps(case["num_inference_steps"].as_u64().context("k")? as usize)?;
        let ours: Vec<(usize, (f32, f32))> = our_queries(s.sigmas().context("sigmas")?)
            .into_iter()
            .enumerate()
            .filter_map(|(i, q)| q.map(|q| (i, q)))
            .collect();
        ensure!(
            ours.len() == theirs.len(),
            "{id}: {} queries, diffusers made {}",
            ours.len(),
            theirs.len()
        );
        // The tree spans the smallest positive and the largest sigma, rounded to 1e-6; where
        // an end differs, the whole tree is split elsewhere.
        let span = |sigmas: &[f32]| {
            let lo = sigmas
                .iter()
                .copied()
                .filter(|&v| v > 0.0)
                .fold(f32::INFINITY, f32::min);
            let hi = sigmas.iter().copied().fold(0f32, f32::max);
            (rounded(lo), rounded(hi))
        };
        let our_sigmas: Vec<f32> = s
            .sigmas()
            .context("sigmas")?
            .iter()
            .map(|&v| v as f32)
            .collect();
        let their_sigmas: Vec<f32> = case["diffusers_sigmas"]
            .as_array()
            .context("sigmas")?
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0) as f32)
            .collect();
        let same_tree = span(&our_sigmas) == span(&their_sigmas);
        for (&(i, (a, b)), &(ta, tb)) in ours.iter().zip(&theirs) {
            if !same_tree || rounded(a) != rounded(ta) || rounded(b) != rounded(tb) {
                // Only ever a last-bit difference of torch's MKL sqrt/log/exp.
                let ulps = |x: f32, y: f32| (x.to_bits() as i64 - y.to_bits() as i64).abs();
                ensure!(
                    ulps(a, ta) <= 4 && ulps(b, tb) <= 4,
                    "{id} step {i}: query ({a}, {b}), diffusers ({ta}, {tb})"
                );
                moved.push(i);
            }
        }
    }
    outcome.moved = moved.len();
    outcome.closed_loop = moved.is_empty();
    let modes: &[bool] = if moved.is_empty() {
        &[false, true]
    } else {
        &[false]
    };
    for &closed_loop in modes {
        let mut s = load_value(&case["config"])?;
        s.set_timesteps(case["num_inference_steps"].as_u64().context("k")? as usize)?;
        check_schedule(case, &s)?;
        let mut generator = case["step"]["seed"].as_u64().map(TorchGenerator::new);
        let mut x = tensors.tensor4("sample0")?;
        for (i, t) in s.timesteps().to_vec().into_iter().enumerate() {
            let reference = if i == 0 {
                "sample0".to_string()
            } else {
                format!("{id}/prev/{}", i - 1)
            };
            let scale = max_abs(tensors.values(&reference)?);
            if !closed_loop {
                x = tensors.tensor4(&reference)?;
            }
            let input = s.scale_model_input(x.clone(), t)?;
            let mut options = StepOptions::default();
            if let Some(g) = generator.as_mut() {
                options = options.with_generator(g);
            }
            let out = s
                .step(dummy_model(&input, t, "default"), t, x, options)
                .with_context(|| format!("{id}: step {i}"))?;
            x = out.prev_sample;
            let compared: &[(&str, Option<&Tensor<4>>)] = if moved.contains(&i) {
                &[("x0", out.pred_original_sample.as_ref())]
            } else {
                &[
                    ("prev", Some(&x)),
                    ("x0", out.pred_original_sample.as_ref()),
                ]
            };
            for (what, ours) in compared {
                let key = format!("{id}/{what}/{i}");
                let err = rel_err_scaled(&host(ours.context("x0")?), tensors.values(&key)?, scale);
                ensure!(
                    err <= SAMPLE_RTOL,
                    "{id} ({}) {}: {key}: relative error {err:e}",
                    case["config"],
                    if closed_loop {
                        "closed loop"
                    } else {
                        "step by step"
                    }
                );
                outcome.worst = outcome.worst.max(err);
            }
            outcome.steps += usize::from(!closed_loop);
        }
    }
    Ok(outcome)
}

/// The scheduler a fixture config describes, built through [`AnyScheduler`] as a loaded
/// `scheduler_config.json` would be.
fn load_value(config: &Value) -> Result<DPMSolverSDEScheduler> {
    match build(CLASS, config)? {
        AnyScheduler::DpmSolverSde(s) => Ok(s),
        other => anyhow::bail!("built a {}", other.class_name()),
    }
}

#[test]
fn trajectories_match_diffusers() -> Result<()> {
    let cases = read_json("sde/cases.json")?;
    let tensors = Tensors::load("sde/trajectories.safetensors")?;
    let cases = cases.as_array().context("cases")?;
    ensure!(cases.len() >= 30, "only {} trajectories", cases.len());
    let (mut worst, mut steps, mut moved, mut closed) = (0f64, 0, 0, 0);
    for case in cases {
        let o = check_trajectory(case, &tensors)?;
        worst = worst.max(o.worst);
        steps += o.steps;
        moved += o.moved;
        closed += usize::from(o.closed_loop);
    }
    eprintln!(
        "  DPMSolverSDEScheduler: {} trajectories ({closed} also closed loop), {steps} steps, \
         {moved} with a Brownian query moved by MKL rounding; worst relative error {worst:e}",
        cases.len()
    );
    // The moved queries are the exception, not the rule (9% of the steps on the machine that
    // wrote the fixtures, a whole trajectory among them).
    ensure!(moved * 5 <= steps, "{moved} of {steps} steps moved");
    ensure!(closed * 2 >= cases.len(), "only {closed} closed loops");
    Ok(())
}

#[test]
fn add_noise_matches_diffusers() -> Result<()> {
    let tensors = Tensors::load("sde/forward.safetensors")?;
    let noise = tensors.tensor4("noise")?;
    let original = Tensors::load("sde/trajectories.safetensors")?.tensor4("sample0")?;
    for case in read_json("sde/forward.json")?.as_array().context("cases")? {
        let mut s = load_value(&case["config"])?;
        s.set_timesteps(case["num_inference_steps"].as_u64().context("k")? as usize)?;
        if let Some(b) = case["begin_index"].as_u64() {
            s.set_begin_index(b as usize)?;
        }
        // diffusers' midpoint timesteps carry its MKL-rounded sigma table (a few 1e-6 off
        // ours), so the same schedule positions are looked up by index.
        let indices: Vec<usize> = serde_json::from_value(case["timestep_indices"].clone())?;
        let ts: Vec<f64> = indices.iter().map(|&i| s.timesteps()[i]).collect();
        let ours = s.add_noise(original.clone(), noise.clone(), &ts)?;
        let key = case["key"].as_str().context("key")?;
        let err = rel_err(&host(&ours), tensors.values(key)?);
        ensure!(err <= 1e-6, "{key}: relative error {err:e}");
    }
    Ok(())
}

/// `get_scheduler_config` of diffusers' test.
fn test_config() -> DPMSolverSDESchedulerConfig {
    DPMSolverSDESchedulerConfig {
        num_train_timesteps: 1100,
        beta_start: 0.0001,
        beta_end: 0.02,
        noise_sampler_seed: Some(0),
        ..Default::default()
    }
}

/// diffusers' test loop: 10 steps, the scaled sample replaces the sample, model
/// `x * t / (t + 1)`.
fn sigma_loop(name: &str, config: DPMSolverSDESchedulerConfig) -> Result<()> {
    let mut s = DPMSolverSDEScheduler::new(config)?;
    s.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false).mul_scalar(s.init_noise_sigma() as f32);
    let scale = max_abs(&host(&x));
    for t in s.timesteps().to_vec() {
        x = s.scale_model_input(x, t)?;
        let out = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = s.step(out, t, x, StepOptions::default())?.prev_sample;
    }
    check_golden(&golden_in("sde", name)?, &x, scale)
}

#[test]
fn diffusers_full_loops() -> Result<()> {
    sigma_loop("sde/full_loop_no_noise", test_config())?;
    sigma_loop(
        "sde/full_loop_with_v_prediction",
        DPMSolverSDESchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            ..test_config()
        },
    )?;
    sigma_loop(
        "sde/full_loop_device_karras_sigmas",
        DPMSolverSDESchedulerConfig {
            use_karras_sigmas: true,
            ..test_config()
        },
    )
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file_in("sde", CLASS);
    let s = DPMSolverSDEScheduler::load(&path)?;
    ensure!(*s.config() == DPMSolverSDESchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    let theirs = comparable(diffusion_core::config::read_json(&path)?);
    ensure!(comparable(s.config_value()) == theirs);
    Ok(())
}

#[test]
fn reachable_by_class_name_and_a1111_names_follow_the_docs_table() -> Result<()> {
    let spec = SchedulerSpec::parse(CLASS)?;
    ensure!(spec.kind == SchedulerKind::DpmSolverSde && spec.overrides.is_empty());
    ensure!(SchedulerKind::DpmSolverSde.step_takes_generator());
    // diffusers' table of A1111 names sends "DPM++ SDE" to the singlestep solver.
    for name in ["DPM++ SDE", "DPM++ SDE Karras"] {
        ensure!(SchedulerSpec::parse(name)?.kind == SchedulerKind::DpmSolverSinglestep);
    }
    let euler = build("EulerDiscreteScheduler", &serde_json::json!({}))?;
    let sde = AnyScheduler::convert(&euler, &spec)?;
    ensure!(sde.class_name() == CLASS && sde.order() == 2);
    Ok(())
}

#[test]
fn the_seed_comes_from_the_generator_without_noise_sampler_seed() -> Result<()> {
    let run = |seed: u64| -> Result<Vec<f32>> {
        let mut s = DPMSolverSDEScheduler::new(DPMSolverSDESchedulerConfig::default())?;
        s.set_timesteps(3)?;
        let mut x = tensor(vec![0.5f32; 2 * 4 * 2 * 2], [2, 4, 2, 2]);
        let mut g = TorchGenerator::new(seed);
        for t in s.timesteps().to_vec() {
            let out = x.clone().mul_scalar(0.1);
            x = s
                .step(out, t, x, StepOptions::default().with_generator(&mut g))?
                .prev_sample;
        }
        Ok(host(&x))
    };
    ensure!(run(1)? == run(1)?);
    ensure!(run(1)? != run(2)?);
    // A fixed seed ignores the generator.
    let mut s = DPMSolverSDEScheduler::new(DPMSolverSDESchedulerConfig {
        noise_sampler_seed: Some(3),
        ..Default::default()
    })?;
    s.set_timesteps(3)?;
    let x = tensor(vec![0.5f32; 4], [1, 1, 2, 2]);
    let t = s.timesteps()[0];
    let a = s.step(x.clone(), t, x.clone(), StepOptions::default())?;
    s.set_timesteps(3)?;
    let mut g = TorchGenerator::new(9);
    let b = s.step(
        x.clone(),
        t,
        x,
        StepOptions::default().with_generator(&mut g),
    )?;
    ensure!(host(&a.prev_sample) == host(&b.prev_sample));
    Ok(())
}

#[test]
fn bad_configs_are_refused() {
    let bad = |c: DPMSolverSDESchedulerConfig| field_name(DPMSolverSDEScheduler::new(c));
    assert_eq!(
        bad(DPMSolverSDESchedulerConfig {
            prediction_type: PredictionType::Sample,
            ..Default::default()
        }),
        "prediction_type"
    );
    assert_eq!(
        bad(DPMSolverSDESchedulerConfig {
            use_karras_sigmas: true,
            use_exponential_sigmas: true,
            ..Default::default()
        }),
        "use_exponential_sigmas"
    );
    assert_eq!(
        bad(DPMSolverSDESchedulerConfig {
            beta_schedule: diffusion_schedulers::BetaSchedule::Exp,
            ..Default::default()
        }),
        "beta_schedule"
    );
}

#[test]
fn bad_arguments_are_refused() -> Result<()> {
    let mut s = DPMSolverSDEScheduler::new(DPMSolverSDESchedulerConfig::default())?;
    ensure!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 500.0])))
            == "timesteps"
    );
    ensure!(arg_name(s.set_timesteps(0)) == "num_inference_steps");
    s.set_timesteps(2)?;
    let x = tensor(vec![0.5f32; 4], [1, 1, 2, 2]);
    let t = s.timesteps()[0];
    ensure!(arg_name(s.step(x.clone(), 12.5, x.clone(), StepOptions::default())) == "timestep");
    // No seed and no generator: nothing to seed the Brownian tree with.
    ensure!(arg_name(s.step(x.clone(), t, x.clone(), StepOptions::default())) == "generator");
    let eta = StepOptions {
        eta: Some(0.5),
        ..StepOptions::default()
    };
    ensure!(arg_name(s.step(x.clone(), t, x.clone(), eta)) == "eta");
    let other: Tensor<4> = tensor(vec![0.5f32; 8], [2, 1, 2, 2]);
    ensure!(arg_name(s.step(other, t, x.clone(), StepOptions::default())) == "model_output");

    // The tree is shaped by the first sample; another shape later is refused.
    let mut g = TorchGenerator::new(0);
    let out = s.step(
        x.clone(),
        t,
        x.clone(),
        StepOptions::default().with_generator(&mut g),
    )?;
    let t1 = s.timesteps()[1];
    let wide: Tensor<4> = tensor(vec![0.5f32; 8], [2, 1, 2, 2]);
    ensure!(arg_name(s.step(wide.clone(), t1, wide, StepOptions::default())) == "sample");
    let x = out.prev_sample;
    s.step(x.clone(), t1, x.clone(), StepOptions::default())?;
    let t2 = s.timesteps()[2];
    let x = s
        .step(x.clone(), t2, x, StepOptions::default())?
        .prev_sample;
    // The schedule is exhausted.
    ensure!(arg_name(s.step(x.clone(), t2, x, StepOptions::default())) == "timestep");
    Ok(())
}
