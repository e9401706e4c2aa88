//! RePaintScheduler: diffusers' RePaintPipeline loop (steps and undos) on the oracle's fixtures
//! (fixtures/schedulers/extra/), default config file and bad input. diffusers has no scheduler
//! test for RePaint, so there are no golden numbers.

use anyhow::{Context, Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_schedulers::{
    ConfiguredScheduler, RePaintScheduler, RePaintSchedulerConfig, Scheduler, StepOptions,
};
use serde_json::Value;

use crate::common::{
    Tensors, arg_name, build, dummy_model, field_name, host, max_abs, read_json, rel_err_scaled,
    tensor,
};
use crate::more::{comparable, default_config_file_in};

#[test]
fn pipeline_loops_match_diffusers() -> Result<()> {
    let cases = read_json("extra/cases.json")?;
    let tensors = Tensors::load("extra/trajectories.safetensors")?;
    let original = tensors.tensor4("repaint/original")?;
    let (mut n, mut undos, mut worst) = (0, 0, 0f64);
    for case in cases.as_array().context("cases")? {
        if case["loop"] != "repaint" {
            continue;
        }
        let id = case["id"].as_str().context("id")?;
        let any = build("RePaintScheduler", &case["config"])?;
        let mut s = any.as_repaint().context("repaint")?.clone();
        let arg = |k: &str| case[k].as_u64().map(|v| v as usize).context("arg");
        s.set_timesteps_jumps(
            arg("num_inference_steps")?,
            arg("jump_length")?,
            arg("jump_n_sample")?,
        )?;
        let expected: Vec<f64> = case["diffusers_timesteps"]
            .as_array()
            .context("ts")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        ensure!(
            s.timesteps() == expected.as_slice(),
            "{id}: timesteps {:?}",
            s.timesteps()
        );
        let mask = tensors.tensor4(&format!(
            "repaint/mask/{}",
            case["mask"].as_str().context("mask")?
        ))?;
        let mut generator = TorchGenerator::new(case["step"]["seed"].as_u64().context("seed")?);
        let mut x = tensors.tensor4("sample0")?;
        let mut t_last = s.timesteps()[0] + 1.0;
        for (i, t) in s.timesteps().to_vec().into_iter().enumerate() {
            let scale = max_abs(&host(&x));
            let options = StepOptions::default().with_generator(&mut generator);
            if t < t_last {
                let out = s.step_inpaint(
                    dummy_model(&x, t, "default"),
                    t,
                    x.clone(),
                    original.clone(),
                    mask.clone(),
                    options,
                )?;
                let x0 = out.pred_original_sample.context("x0")?;
                let err =
                    rel_err_scaled(&host(&x0), tensors.values(&format!("{id}/x0/{i}"))?, scale);
                ensure!(err <= 1e-5, "{id} x0 {i}: relative error {err:e}");
                worst = worst.max(err);
                x = out.prev_sample;
            } else {
                x = s.undo_step(x, t_last, options)?;
                undos += 1;
            }
            let err = rel_err_scaled(&host(&x), tensors.values(&format!("{id}/prev/{i}"))?, scale);
            ensure!(err <= 1e-5, "{id} step {i} (t={t}): relative error {err:e}");
            worst = worst.max(err);
            t_last = t;
        }
        n += 1;
    }
    eprintln!("  RePaintScheduler: {n} loops ({undos} undos), worst relative error {worst:e}");
    ensure!(n >= 5 && undos > 0, "only {n} loops, {undos} undos");
    Ok(())
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file_in("extra", "RePaintScheduler");
    let s = RePaintScheduler::load(&path)?;
    ensure!(*s.config() == RePaintSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    ensure!(s.timesteps().len() == 1000 && s.init_noise_sigma() == 1.0);
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    let bad = RePaintSchedulerConfig {
        eta: -1.0,
        ..Default::default()
    };
    assert_eq!(field_name(RePaintScheduler::new(bad)), "eta");
    let bad = RePaintSchedulerConfig {
        beta_schedule: diffusion_schedulers::BetaSchedule::Exp,
        ..Default::default()
    };
    assert_eq!(field_name(RePaintScheduler::new(bad)), "beta_schedule");
    let mut s = RePaintScheduler::new(Default::default())?;
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    let mask = tensor(vec![1.0f32; 4], [1, 1, 2, 2]);
    let mut generator = TorchGenerator::new(0);
    let options = || StepOptions::default();
    assert_eq!(
        arg_name(s.step_inpaint(x.clone(), 990.0, x.clone(), x.clone(), x.clone(), options())),
        "num_inference_steps"
    );
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(arg_name(s.set_timesteps_jumps(10, 0, 10)), "jump_length");
    s.set_timesteps(10)?;
    // The generic step cannot carry the known image and mask; add_noise is refused as in
    // diffusers.
    assert_eq!(
        arg_name(s.step(x.clone(), 900.0, x.clone(), options())),
        "original_image"
    );
    assert_eq!(
        arg_name(s.add_noise(x.clone(), x.clone(), &[900.0])),
        "add_noise"
    );
    assert_eq!(
        arg_name(s.step_inpaint(x.clone(), 900.0, x.clone(), x.clone(), mask, options())),
        "mask"
    );
    assert_eq!(
        arg_name(s.step_inpaint(
            x.clone(),
            1000.0,
            x.clone(),
            x.clone(),
            x.clone(),
            options()
        )),
        "timestep"
    );
    assert_eq!(
        arg_name(s.step_inpaint(x.clone(), 900.0, x.clone(), x.clone(), x.clone(), options())),
        "generator"
    );
    assert_eq!(
        arg_name(s.undo_step(x.clone(), 950.0, options().with_generator(&mut generator))),
        "timestep"
    );
    let noise = tensor(vec![0.1f32; 16], [1, 1, 4, 4]);
    assert_eq!(
        arg_name(s.undo_step(x.clone(), 100.0, options().with_variance_noise(noise))),
        "variance_noise"
    );
    let y = s.undo_step(x, 100.0, options().with_generator(&mut generator))?;
    ensure!(host(&y).iter().all(|v| v.is_finite()));
    Ok(())
}
