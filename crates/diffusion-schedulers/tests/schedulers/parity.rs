//! Parity with diffusers on the oracle's fixtures (fixtures/oracle/gen_schedulers.py).

use anyhow::{Context, Result, anyhow, ensure};
use diffusion_core::{Error, TorchGenerator};
use diffusion_schedulers::{AnyScheduler, NoiseSchedule, Scheduler, SetTimesteps, StepOptions};
use serde_json::Value;

use crate::common::{
    Tensors, build, dummy_model, host, max_abs, read_json, rel_err, rel_err_scaled, tensor,
};

/// Sample tolerance: norm-wise relative error `max|ours - theirs| / max|theirs|` (schedules as
/// float32-exact `f64`, step scalars in float32 as diffusers computes them, f32 tensors).
const SAMPLE_RTOL: f64 = 1e-5;

/// Sigma tolerance: sigmas are float32 values computed from torch's CPU `sqrt`/`log`, which are
/// within an ulp or two of correctly rounded; a few float32 ulps.
const SIGMA_RTOL: f64 = 4.0 * f32::EPSILON as f64;

/// How far a timestep found by inverting the log-sigma table may move when its sigma is off
/// by [`SIGMA_RTOL`]: `t` is linear in `ln(sigma)` between table entries, so a relative sigma
/// error `e` moves it by `e / (ln sigma_{j+1} - ln sigma_j)` (at least `e * t`).
fn sigma_timestep_tol(t: f64, log_sigmas: &[f64]) -> f64 {
    if log_sigmas.len() < 2 {
        return SIGMA_RTOL * t.abs();
    }
    let j = (t.max(0.0).floor() as usize).min(log_sigmas.len().saturating_sub(2));
    let spacing = (log_sigmas[j + 1] - log_sigmas[j]).abs();
    (SIGMA_RTOL * t.abs()).max(SIGMA_RTOL / spacing)
}

/// The extra relative sigma error a zero-SNR schedule carries: diffusers' rescaled
/// `sqrt(alpha_bar)` comes out of torch's (MKL) sqrt within 4 float32 ulps of 1.0 of ours
/// (the bound `schedules_match_diffusers_float32_for_float32` checks), and
/// `sigma = sqrt((1 - a) / a)` turns an absolute error `e` in `sqrt(a)` into the relative
/// error `e / (sqrt(a) (1 - a))`.
fn zero_snr_sigma_rtol(sigma: f64) -> f64 {
    let a = 1.0 / (1.0 + sigma * sigma);
    let e = 4.0 * f64::from(f32::EPSILON) / 2.0;
    e / (a.sqrt() * (1.0 - a))
}

fn schedule_of(s: &AnyScheduler) -> Result<&NoiseSchedule> {
    if let Some(s) = s.as_ddpm() {
        return Ok(s.noise_schedule());
    }
    s.as_ddim()
        .map(|s| s.noise_schedule())
        .ok_or_else(|| anyhow!("no noise schedule for {}", s.class_name()))
}

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn schedules_match_diffusers_float32_for_float32() -> Result<()> {
    let meta = read_json("timesteps.json")?;
    let tensors = Tensors::load("schedules.safetensors")?;
    let cases = meta["schedules"].as_array().context("schedules")?;
    ensure!(cases.len() >= 10, "too few schedule cases");
    for case in cases {
        let key = case["key"].as_str().context("key")?;
        let scheduler = build(case["class"].as_str().context("class")?, &case["config"])?;
        let schedule = schedule_of(&scheduler)?;
        for (name, ours) in [
            ("betas", &schedule.betas),
            ("alphas_cumprod", &schedule.alphas_cumprod),
        ] {
            let theirs = tensors.values(&format!("{key}/{name}"))?;
            ensure!(ours.len() == theirs.len(), "{key}/{name}: length");
            // The widened values are exactly float32 values: nothing was computed in between.
            ensure!(
                ours.iter().all(|&v| f64::from(v as f32) == v),
                "{key}/{name} not f32"
            );
            let what = format!("{key}/{name} ({})", case["config"]);
            if case["config"]["rescale_betas_zero_snr"] == true {
                // torch's CPU sqrt (MKL) is off by up to an ulp where ours is correctly
                // rounded, and the rescaling subtracts nearly equal square roots; diffusers'
                // sqrt(alpha_bar) sits within 3.5 float32 ulps of 1.0 of ours (measured).
                let tol = if name == "betas" {
                    1e-5
                } else {
                    8.0 * f64::from(f32::EPSILON) / 2.0
                };
                let worst = ours
                    .iter()
                    .zip(theirs)
                    .map(|(&a, &b)| {
                        if name == "betas" {
                            (a - f64::from(b)).abs()
                        } else {
                            (a.sqrt() - f64::from(b).sqrt()).abs()
                        }
                    })
                    .fold(0f64, f64::max);
                ensure!(worst <= tol, "{what}: off diffusers by {worst:e}");
                ensure!(*ours.last().context("empty")? == f64::from(theirs[theirs.len() - 1]));
            } else {
                // torch's vectorised sigmoid (Sleef exp) differs from a scalar expf by an ulp
                // or two; every other schedule is built exactly as torch builds it.
                let max_ulps = if case["config"]["beta_schedule"] == "sigmoid" {
                    4
                } else {
                    0
                };
                let worst = ours
                    .iter()
                    .zip(theirs)
                    .map(|(&a, &b)| ulps(a as f32, b))
                    .max()
                    .unwrap_or(0);
                ensure!(worst <= max_ulps, "{what}: {worst} ulps off diffusers");
            }
        }
        if let Some(expected) = case.get("final_alpha_cumprod") {
            let ddim = scheduler.as_ddim().context("ddim")?;
            ensure!(
                ddim.final_alpha_cumprod() == expected.as_f64().context("final")?,
                "{key}: final_alpha_cumprod"
            );
        }
    }
    Ok(())
}

#[test]
fn timesteps_match_diffusers() -> Result<()> {
    let meta = read_json("timesteps.json")?;
    let cases = meta["timesteps"].as_array().context("timesteps")?;
    let (mut overshoots, mut past_end) = (0, 0);
    for case in cases {
        let config = serde_json::json!({
            "num_train_timesteps": case["num_train_timesteps"],
            "timestep_spacing": case["timestep_spacing"],
            "steps_offset": case["steps_offset"],
        });
        let mut scheduler = build(case["class"].as_str().context("class")?, &config)?;
        let k = case["num_inference_steps"].as_u64().context("k")? as usize;
        let n = case["num_train_timesteps"].as_u64().context("n")? as usize;
        let theirs: Vec<f64> = case["timesteps"]
            .as_array()
            .context("list")?
            .iter()
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
            .collect();
        let first_past_end = theirs.first().is_some_and(|&t| t >= n as f64);
        let result = scheduler.set_timesteps(k);
        if first_past_end {
            // diffusers accepts a steps_offset that pushes a leading timestep to
            // num_train_timesteps and fails with an index error at the first step.
            ensure!(
                matches!(&result, Err(Error::InvalidArgument { name, .. }) if name == "steps_offset"),
                "{case}: expected a steps_offset error, got {result:?}"
            );
            past_end += 1;
            continue;
        }
        result?;
        let ours = scheduler.timesteps();
        ensure!(ours.len() == k, "{case}: got {} timesteps", ours.len());
        if theirs.len() == k + 1 {
            // numpy's arange overshoots for some trailing step counts; the extra entry is -1.
            ensure!(theirs[k] == -1.0, "{case}: unexpected extra timestep");
            overshoots += 1;
        } else {
            ensure!(theirs.len() == k, "{case}: diffusers gave {}", theirs.len());
        }
        ensure!(ours == &theirs[..k], "{case}: ours {ours:?}");
    }
    // The fixture includes step counts where diffusers overshoots (61, 103, 121, 397 of 1000).
    ensure!(
        overshoots >= 4,
        "expected diffusers' trailing overshoot cases, saw {overshoots}"
    );
    ensure!(
        past_end >= 2,
        "expected leading + steps_offset cases past the end, saw {past_end}"
    );
    Ok(())
}

/// The noise sources a fixture case asks for, freshly seeded.
struct Noise {
    generator: Option<TorchGenerator>,
    per_image: Option<Vec<TorchGenerator>>,
    variance_noise: Option<TorchGenerator>,
}

impl Noise {
    fn new(step_kw: &Value) -> Self {
        Self {
            generator: step_kw["seed"].as_u64().map(TorchGenerator::new),
            per_image: step_kw["per_image_seeds"].as_array().map(|seeds| {
                seeds
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(TorchGenerator::new)
                    .collect()
            }),
            variance_noise: step_kw["noise_seed"].as_u64().map(TorchGenerator::new),
        }
    }

    fn options(&mut self, case: &Value, shape: [usize; 4]) -> StepOptions<'_, 4> {
        let mut options = StepOptions::default();
        if let Some(g) = self.generator.as_mut() {
            options = options.with_generator(g);
        }
        if let Some(gens) = self.per_image.as_mut() {
            options = options.with_generators(gens);
        }
        let step = &case["step"];
        if case["class"] == "DDIMScheduler" || case["class"] == "DDIMParallelScheduler" {
            options.eta = Some(step["eta"].as_f64().unwrap_or(0.0));
            options.use_clipped_model_output =
                Some(step["use_clipped_model_output"].as_bool().unwrap_or(false));
        } else {
            // TCD's gamma.
            options.eta = step["eta"].as_f64();
        }
        options.s_churn = step["s_churn"].as_f64();
        options.s_tmin = step["s_tmin"].as_f64();
        options.s_tmax = step["s_tmax"].as_f64();
        options.s_noise = step["s_noise"].as_f64();
        if let Some(g) = self.variance_noise.as_mut() {
            options = options.with_variance_noise(tensor(g.randn(&shape), shape));
        }
        options
    }
}

fn scheduler_for(case: &Value) -> Result<AnyScheduler> {
    let id = case["id"].as_str().context("id")?;
    let mut scheduler = build(case["class"].as_str().context("class")?, &case["config"])?;
    let floats = |v: &Value| -> Option<Vec<f64>> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
    };
    let mut request = if let Some(custom) = floats(&case["custom_timesteps"]) {
        Some(SetTimesteps::custom_timesteps(custom))
    } else if let Some(custom) = floats(&case["custom_sigmas"]) {
        Some(SetTimesteps::custom_sigmas(custom))
    } else {
        case["num_inference_steps"]
            .as_u64()
            .map(|k| SetTimesteps::steps(k as usize))
    };
    if let (Some(r), Some(mu)) = (request.as_mut(), case["mu"].as_f64()) {
        r.mu = Some(mu);
    }
    if let Some(request) = request {
        scheduler.set_timesteps_with(request)?;
    }
    let steps = case["num_steps_run"].as_u64().context("steps")? as usize;
    let expected = floats(&case["diffusers_timesteps"]).context("ts")?;
    // Timesteps found from sigmas stay fractional and inherit the last-ulp differences of the
    // sigmas: Euler's Karras/exponential spacings and custom sigmas invert the log-sigma table
    // (relative error of a few ulps), continuous timesteps are `0.25 ln(sigma)` (absolute error
    // of a quarter of sigma's relative error). All others must be exact.
    let c = &case["config"];
    let euler = case["class"] != "DPMSolverMultistepScheduler";
    // iPNDM's timesteps are float32 `atan2` values in [0, 1] (torch's vectorised atan2 is not
    // correctly rounded).
    // EDM's are `ln(sigma) / 4` like Euler's continuous ones.
    let continuous = euler && c["timestep_type"] == "continuous"
        || case["class"] == "IPNDMScheduler"
        || case["class"] == "EDMEulerScheduler"
        || case["class"] == "EDMDPMSolverMultistepScheduler"
        || case["class"] == "CosineDPMSolverMultistepScheduler"
        || case["class"] == "CMStochasticIterativeScheduler";
    // KDPM2's interleaved midpoint timesteps are all found from sigmas.
    let kdpm2 = case["class"]
        .as_str()
        .is_some_and(|class| class.starts_with("KDPM2"));
    let from_sigmas = kdpm2
        || euler
            && (c["use_karras_sigmas"] == true
                || c["use_exponential_sigmas"] == true
                || c["use_beta_sigmas"] == true
                || case["custom_sigmas"].is_array());
    // (Flow-matching schedulers have no table: their timesteps are compared exactly.)
    let log_sigmas: Vec<f64> = scheduler
        .noise_schedule()
        .map(|schedule| {
            schedule
                .alphas_cumprod
                .iter()
                .map(|&a| ((1.0 - a) / a).sqrt().ln())
                .collect()
        })
        .unwrap_or_default();
    // Ancestral KDPM2's midpoint between sigma and sigma_down, with
    // `sigma_down = sqrt(next^2 - up^2)` where `up` is nearly `next` on the last steps: the
    // subtraction amplifies a last-bit difference in torch's (MKL) sqrt of `up` by
    // `(next / sigma_down)^2`, and the midpoint and its timestep inherit that.
    let amplification = |i: usize| -> f64 {
        match scheduler.as_kdpm2_ancestral() {
            Some(a) if i % 2 == 1 => {
                let next = a.sigmas().map_or(0.0, |s| s[i]);
                (next / a.sigmas_down()[i - 1]).powi(2).max(1.0)
            }
            _ => 1.0,
        }
    };
    let ours = scheduler.timesteps();
    let close = ours.len() == steps
        && ours
            .iter()
            .zip(&expected[..steps])
            .enumerate()
            .all(|(i, (a, b))| {
                a == b
                    || (from_sigmas
                        && (a - b).abs() <= sigma_timestep_tol(*b, &log_sigmas) * amplification(i))
                    || (continuous && (a - b).abs() <= SIGMA_RTOL)
            });
    ensure!(
        close,
        "{id} ({c}): timesteps {ours:?}, diffusers {:?}",
        &expected[..steps]
    );
    if let Some(expected) = floats(&case["diffusers_sigmas"]) {
        let ours = scheduler.sigmas().context("sigmas")?;
        let zero_snr = c["rescale_betas_zero_snr"] == true;
        // Error in units of the sigma's tolerance.
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| {
                let rel = (a - b).abs() / b.abs().max(1e-30);
                rel / (SIGMA_RTOL
                    + if zero_snr {
                        zero_snr_sigma_rtol(*b)
                    } else {
                        0.0
                    })
            })
            .fold(0f64, f64::max);
        ensure!(
            ours.len() == expected.len() && worst <= 1.0,
            "{id} ({}): sigmas {ours:?}, diffusers {expected:?}",
            case["config"]
        );
    }
    // (The flow-matching schedulers have no init_noise_sigma in diffusers.)
    if let Some(init) = case["init_noise_sigma"].as_f64() {
        ensure!(
            (scheduler.init_noise_sigma() - init).abs() <= SIGMA_RTOL * init,
            "{id}: init_noise_sigma {} vs {init}",
            scheduler.init_noise_sigma()
        );
    }
    Ok(scheduler)
}

/// Check one fixture trajectory twice and return the worst error seen: step by step, each
/// step fed diffusers' previous sample (every formula and branch in isolation), then closed
/// loop from the initial sample (nothing drifts over the chain).
pub(crate) fn check_trajectory(case: &Value, tensors: &Tensors) -> Result<f64> {
    let id = case["id"].as_str().context("id")?;
    let model = case["model"].as_str().unwrap_or("default");
    let mut worst = 0f64;
    // Errors are measured against the larger of the result and the step's input sample (see
    // rel_err_scaled).
    let mut compare = |what: &str, actual: &[f32], key: String, input_scale: f64| -> Result<()> {
        let err = rel_err_scaled(actual, tensors.values(&key)?, input_scale);
        ensure!(
            err <= SAMPLE_RTOL,
            "{id} ({} {}): {what} {key}: relative error {err:e}",
            case["class"],
            case["config"]
        );
        worst = worst.max(err);
        Ok(())
    };

    for closed_loop in [false, true] {
        let mut scheduler = scheduler_for(case)?;
        let mut noise = Noise::new(&case["step"]);
        let mut x = tensors.tensor4("sample0")?;
        let shape = x.dims();
        let what = if closed_loop {
            "closed loop"
        } else {
            "step by step"
        };
        for (i, t) in scheduler.timesteps().to_vec().into_iter().enumerate() {
            let reference_input = if i == 0 {
                "sample0".to_string()
            } else {
                format!("{id}/prev/{}", i - 1)
            };
            let input_scale = max_abs(tensors.values(&reference_input)?);
            if !closed_loop {
                x = tensors.tensor4(&reference_input)?;
            }
            let input = scheduler.scale_model_input(x.clone(), t)?;
            let out = scheduler
                .step(
                    dummy_model(&input, t, model),
                    t,
                    x,
                    noise.options(case, shape),
                )
                .with_context(|| format!("{id}: step {i} at t={t}"))?;
            x = out.prev_sample;
            compare(what, &host(&x), format!("{id}/prev/{i}"), input_scale)?;
            let x0_key = format!("{id}/x0/{i}");
            match (&out.pred_original_sample, tensors.get(&x0_key).is_ok()) {
                (Some(x0), true) => compare(what, &host(x0), x0_key, input_scale)?,
                (None, false) => {}
                (ours, _) => anyhow::bail!(
                    "{id}: pred_original_sample is {} here but not in diffusers",
                    if ours.is_some() { "given" } else { "missing" }
                ),
            }
        }
    }
    Ok(worst)
}

#[test]
fn trajectories_match_diffusers() -> Result<()> {
    let cases = read_json("cases.json")?;
    let tensors = Tensors::load("trajectories.safetensors")?;
    let cases = cases.as_array().context("cases")?;
    ensure!(cases.len() >= 100, "too few trajectory cases");
    let mut worst = 0f64;
    let mut by_class = std::collections::BTreeMap::<String, (usize, f64)>::new();
    for case in cases {
        let err = check_trajectory(case, &tensors)?;
        worst = worst.max(err);
        let entry = by_class
            .entry(case["class"].as_str().unwrap_or("?").to_string())
            .or_default();
        *entry = (entry.0 + 1, entry.1.max(err));
    }
    eprintln!(
        "{} trajectories, worst relative error {worst:e}",
        cases.len()
    );
    for (class, (n, err)) in &by_class {
        eprintln!("  {class}: {n} trajectories, worst relative error {err:e}");
    }
    // Every class the crate implements is covered, here or by gen_schedulers_more.py's
    // fixtures (checked in more.rs).
    let more = read_json("more/cases.json")?;
    let extra = read_json("extra/cases.json")?;
    let beta_parallel = read_json("beta_parallel/cases.json")?;
    let sde = read_json("sde/cases.json")?;
    let more: Vec<&str> = more
        .as_array()
        .context("more cases")?
        .iter()
        .chain(extra.as_array().context("extra cases")?)
        .chain(beta_parallel.as_array().context("beta_parallel cases")?)
        .chain(sde.as_array().context("sde cases")?)
        .filter_map(|c| c["class"].as_str())
        .collect();
    for kind in diffusion_schedulers::SchedulerKind::ALL {
        ensure!(
            by_class.contains_key(kind.class_name()) || more.contains(&kind.class_name()),
            "no trajectory fixture for {}",
            kind.class_name()
        );
    }
    Ok(())
}

#[test]
fn add_noise_and_velocity_match_diffusers() -> Result<()> {
    let (with_velocity, sigma_based) = check_forward_cases("forward.json", "forward.safetensors")?;
    ensure!(
        with_velocity >= 20 && sigma_based >= 12,
        "{with_velocity} / {sigma_based} cases"
    );
    Ok(())
}

/// Check every add_noise (and get_velocity) case of a forward fixture; returns how many cases
/// had a velocity target and how many refused one.
pub(crate) fn check_forward_cases(json: &str, safetensors: &str) -> Result<(usize, usize)> {
    let cases = read_json(json)?;
    let tensors = Tensors::load(safetensors)?;
    let original = tensors.tensor4("original")?;
    let noise = tensors.tensor4("noise")?;
    let (mut with_velocity, mut sigma_based) = (0, 0);
    for case in cases.as_array().context("cases")? {
        let key = case["key"].as_str().context("key")?;
        let mut scheduler = build(case["class"].as_str().context("class")?, &case["config"])?;
        if let Some(k) = case["num_inference_steps"].as_u64() {
            scheduler.set_timesteps(k as usize)?;
        }
        if let Some(begin) = case["begin_index"].as_u64() {
            scheduler.set_begin_index(begin as usize)?;
        }
        // The score-SDE scheduler's noise levels are set apart from its timesteps.
        if let (Some(k), AnyScheduler::ScoreSdeVe(s)) =
            (case["set_sigmas"].as_u64(), &mut scheduler)
        {
            s.set_sigmas(k as usize)?;
        }
        let mut ts: Vec<f64> = case["timesteps"]
            .as_array()
            .context("ts")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        // Timesteps given by position in the schedule are taken from ours (they may be found
        // from sigmas, last bit and all).
        if let Some(indices) = case["timestep_indices"].as_array() {
            let schedule = scheduler.timesteps();
            ts = indices
                .iter()
                .filter_map(Value::as_u64)
                .map(|i| schedule[i as usize])
                .collect();
        }
        let noisy = scheduler.add_noise(original.clone(), noise.clone(), &ts)?;
        let err = rel_err(&host(&noisy), tensors.values(&format!("{key}/add_noise"))?);
        ensure!(
            err <= SAMPLE_RTOL,
            "{key} add_noise: relative error {err:e}"
        );
        let velocity = scheduler.get_velocity(original.clone(), noise.clone(), &ts);
        match tensors.get(&format!("{key}/velocity")) {
            Ok((_, expected)) => {
                let err = rel_err(&host(&velocity?), expected);
                ensure!(err <= SAMPLE_RTOL, "{key} velocity: relative error {err:e}");
                with_velocity += 1;
            }
            // diffusers' Euler get_velocity indexes alphas_cumprod by schedule position, not
            // timestep; the sigma schedulers here refuse it rather than copy that.
            Err(_) => {
                ensure!(
                    velocity.is_err(),
                    "{key}: expected get_velocity to be refused"
                );
                sigma_based += 1;
            }
        }
    }
    Ok((with_velocity, sigma_based))
}
