//! Parity with diffusers for the schedulers of fixtures/oracle/gen_schedulers_extra.py
//! (fixtures/schedulers/extra/): trajectories and add_noise. diffusers' own test loops are
//! checked per scheduler (edm_dpm.rs, cosine_dpm.rs, cm.rs, sde_ve.rs, repaint.rs).

use anyhow::{Context, Result, ensure};

use crate::common::{Tensors, read_json};
use crate::parity::{check_forward_cases, check_trajectory};

#[test]
fn trajectories_match_diffusers() -> Result<()> {
    let cases = read_json("extra/cases.json")?;
    let tensors = Tensors::load("extra/trajectories.safetensors")?;
    let mut by_class = std::collections::BTreeMap::<String, (usize, f64)>::new();
    for case in cases.as_array().context("cases")? {
        // The score-SDE predictor-corrector and RePaint loops are checked in sde_ve.rs and
        // repaint.rs.
        if case.get("loop").is_some() {
            continue;
        }
        let err = check_trajectory(case, &tensors)?;
        let entry = by_class
            .entry(case["class"].as_str().unwrap_or("?").to_string())
            .or_default();
        *entry = (entry.0 + 1, entry.1.max(err));
    }
    for (class, (n, err)) in &by_class {
        eprintln!("  {class}: {n} trajectories, worst relative error {err:e}");
        ensure!(*n >= 5, "{class}: only {n} trajectories");
    }
    Ok(())
}

#[test]
fn add_noise_matches_diffusers() -> Result<()> {
    let (with_velocity, sigma_based) =
        check_forward_cases("extra/forward.json", "extra/forward.safetensors")?;
    ensure!(
        with_velocity == 0 && sigma_based >= 14,
        "{sigma_based} cases"
    );
    Ok(())
}

/// diffusers' `from_config` from every other class's default config (as saved to and loaded
/// from `scheduler_config.json`) into the classes of gen_schedulers_extra.py: inherited keys
/// the target ignores are kept (and warned about), and the conversion fails exactly where
/// diffusers' constructor fails (checked with the oracle): a `sigma_min`/`sigma_max` of null
/// (Euler's and UniPC's defaults) reaches the sigma schedules, and EDM DPM-Solver refuses
/// DEIS's `algorithm_type` with a zero final sigma. (diffusers' `_use_default_values` lets a
/// scheduler built in Python with defaults convert anyway; our configs built in code carry
/// every key, like a saved file.)
#[test]
fn every_default_config_converts_as_in_diffusers() -> Result<()> {
    use diffusion_schedulers::{AnyScheduler, Scheduler, SchedulerKind, SchedulerSpec};
    use std::path::Path;
    let targets = [
        "EDMDPMSolverMultistepScheduler",
        "CosineDPMSolverMultistepScheduler",
        "CMStochasticIterativeScheduler",
        "ScoreSdeVeScheduler",
        "RePaintScheduler",
    ];
    let mut failures = Vec::new();
    for source_kind in SchedulerKind::ALL {
        let source =
            AnyScheduler::build(*source_kind, serde_json::json!({}), Path::new("<default>"))?;
        for target in targets {
            let result = AnyScheduler::convert(&source, &SchedulerSpec::parse(target)?);
            match result {
                Ok(mut s) => s.set_timesteps(4)?,
                Err(diffusion_core::Error::ConfigField { field, .. }) => {
                    failures.push(format!("{} -> {target}: {field}", source_kind.class_name()));
                }
                Err(other) => anyhow::bail!("{}: {other}", source_kind.class_name()),
            }
        }
    }
    let mut expected: Vec<String> = ["EulerDiscreteScheduler", "UniPCMultistepScheduler"]
        .iter()
        .flat_map(|source| {
            targets[..4]
                .iter()
                .map(move |target| format!("{source} -> {target}: sigma_max"))
        })
        .collect();
    expected
        .push("DEISMultistepScheduler -> EDMDPMSolverMultistepScheduler: final_sigmas_type".into());
    failures.sort();
    expected.sort();
    ensure!(failures == expected, "conversions refused: {failures:#?}");
    Ok(())
}
