//! Invariants over random configs.

use std::path::Path;

use diffusion_core::ConfigFile;
use diffusion_schedulers::{
    BetaSchedule, ConfiguredScheduler, DDIMScheduler, DDIMSchedulerConfig, DDPMScheduler,
    DDPMSchedulerConfig, DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig,
    DPMSolverSDEScheduler, DPMSolverSDESchedulerConfig, EulerDiscreteScheduler,
    EulerDiscreteSchedulerConfig, PredictionType, Scheduler, TimestepSpacing, VarianceType,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use crate::common::{host, tensor};

fn spacing() -> impl Strategy<Value = TimestepSpacing> {
    prop_oneof![
        Just(TimestepSpacing::Leading),
        Just(TimestepSpacing::Linspace),
        Just(TimestepSpacing::Trailing),
    ]
}

fn beta_schedule() -> impl Strategy<Value = BetaSchedule> {
    prop_oneof![
        Just(BetaSchedule::Linear),
        Just(BetaSchedule::ScaledLinear),
        Just(BetaSchedule::SquaredcosCapV2),
    ]
}

fn ddim_config() -> impl Strategy<Value = DDIMSchedulerConfig> {
    (
        2usize..2000,
        1e-5f64..1e-2,
        1e-2f64..0.05,
        beta_schedule(),
        spacing(),
        0usize..3,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(n, beta_start, beta_end, beta_schedule, spacing, offset, alpha_one, rescale)| {
                DDIMSchedulerConfig {
                    num_train_timesteps: n,
                    beta_start,
                    beta_end,
                    beta_schedule,
                    timestep_spacing: spacing,
                    steps_offset: offset,
                    set_alpha_to_one: alpha_one,
                    rescale_betas_zero_snr: rescale,
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // The module lives under a #[path], where proptest cannot find the crate root.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/schedulers/props.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn timesteps_strictly_decrease_with_the_requested_count(
        config in ddim_config(),
        fraction in 0.0f64..1.0,
    ) {
        let n = config.num_train_timesteps;
        let k = 1 + ((n - 1) as f64 * fraction) as usize;
        let offset = config.steps_offset;
        let leading = config.timestep_spacing == TimestepSpacing::Leading;
        let mut s = DDIMScheduler::new(config).unwrap();
        match s.set_timesteps(k) {
            Ok(()) => {
                let ts = s.timesteps();
                prop_assert_eq!(ts.len(), k);
                prop_assert!(ts.windows(2).all(|w| w[0] > w[1]), "{:?}", ts);
                prop_assert!(ts.iter().all(|&t| t >= 0.0 && t < n as f64 && t.fract() == 0.0));
            }
            // Only an offset may push the first leading timestep past the schedule.
            Err(e) => prop_assert!(leading && offset > 0, "{e}"),
        }
    }

    #[test]
    fn alphas_lie_in_the_unit_interval_and_decrease(config in ddim_config()) {
        let rescale = config.rescale_betas_zero_snr;
        let s = DDIMScheduler::new(config).unwrap();
        let schedule = s.noise_schedule();
        prop_assert!(schedule.alphas.iter().all(|&a| (0.0..=1.0).contains(&a)));
        let cumprod = &schedule.alphas_cumprod;
        // Zero terminal SNR makes the last alpha_bar exactly 0 on purpose.
        let last_ok = if rescale { cumprod[cumprod.len() - 1] == 0.0 } else { cumprod[cumprod.len() - 1] > 0.0 };
        prop_assert!(last_ok, "last alpha_bar {}", cumprod[cumprod.len() - 1]);
        prop_assert!(cumprod[..cumprod.len() - 1].iter().all(|&a| a > 0.0 && a <= 1.0));
        prop_assert!(cumprod.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn add_noise_follows_the_schedule(
        config in ddim_config(),
        values in proptest::collection::vec(-3.0f32..3.0, 8),
        noise in proptest::collection::vec(-3.0f32..3.0, 8),
        t_fraction in 0.0f64..1.0,
    ) {
        let n = config.num_train_timesteps;
        let s = DDIMScheduler::new(config).unwrap();
        let t = ((n - 1) as f64 * t_fraction).floor();
        let a = s.alphas_cumprod()[t as usize];
        let x = tensor(values.clone(), [2, 1, 2, 2]);
        let e = tensor(noise.clone(), [2, 1, 2, 2]);
        let noisy = host(&s.add_noise(x.clone(), e.clone(), &[t]).unwrap());
        let velocity = host(&s.get_velocity(x, e, &[t]).unwrap());
        for i in 0..8 {
            let (x0, n0) = (f64::from(values[i]), f64::from(noise[i]));
            let want = a.sqrt() * x0 + (1.0 - a).sqrt() * n0;
            prop_assert!((f64::from(noisy[i]) - want).abs() <= 1e-5 * (1.0 + want.abs()));
            let want_v = a.sqrt() * n0 - (1.0 - a).sqrt() * x0;
            prop_assert!((f64::from(velocity[i]) - want_v).abs() <= 1e-5 * (1.0 + want_v.abs()));
        }
    }

    #[test]
    fn ddim_config_json_round_trips(config in ddim_config(), clip in any::<bool>(), v in any::<bool>()) {
        let config = DDIMSchedulerConfig {
            clip_sample: clip,
            prediction_type: if v { PredictionType::VPrediction } else { PredictionType::Epsilon },
            ..config
        };
        let s = DDIMScheduler::new(config.clone()).unwrap();
        let text = serde_json::to_string_pretty(&s.config_value()).unwrap();
        let back = ConfigFile::<DDIMSchedulerConfig>::from_json_str(&text, Path::new("p.json")).unwrap();
        prop_assert_eq!(back.config, config);
        prop_assert_eq!(back.class_name.as_deref(), Some("DDIMScheduler"));
    }

    #[test]
    fn ddpm_config_json_round_trips(
        n in 1usize..3000,
        variance in prop_oneof![
            Just(VarianceType::FixedSmall),
            Just(VarianceType::FixedSmallLog),
            Just(VarianceType::FixedLarge),
            Just(VarianceType::FixedLargeLog),
            Just(VarianceType::Learned),
            Just(VarianceType::LearnedRange),
        ],
        schedule in prop_oneof![Just(BetaSchedule::Sigmoid), Just(BetaSchedule::Laplace), beta_schedule()],
        thresholding in any::<bool>(),
        ratio in 0.5f64..1.0,
    ) {
        let config = DDPMSchedulerConfig {
            num_train_timesteps: n,
            variance_type: variance,
            beta_schedule: schedule,
            thresholding,
            dynamic_thresholding_ratio: ratio,
            ..Default::default()
        };
        let s = DDPMScheduler::new(config.clone()).unwrap();
        let text = serde_json::to_string(&s.config_value()).unwrap();
        let back = ConfigFile::<DDPMSchedulerConfig>::from_json_str(&text, Path::new("p.json")).unwrap();
        prop_assert_eq!(&back.config, &config);
        prop_assert!(back.unknown_keys().is_empty());
        let rebuilt = DDPMScheduler::from_config_file(back).unwrap();
        prop_assert_eq!(rebuilt.noise_schedule(), s.noise_schedule());
    }

    #[test]
    fn sigma_schedules_decrease_with_the_requested_count(
        n in 50usize..2000,
        fraction in 0.0f64..0.25,
        spacing in spacing(),
        schedule in beta_schedule(),
        karras in any::<bool>(),
        dpm in any::<bool>(),
    ) {
        let k = 1 + ((n - 1) as f64 * fraction) as usize;
        let (timesteps, sigmas) = if dpm {
            let mut s = DPMSolverMultistepScheduler::new(DPMSolverMultistepSchedulerConfig {
                num_train_timesteps: n,
                beta_schedule: schedule,
                timestep_spacing: spacing,
                use_karras_sigmas: karras && schedule != BetaSchedule::SquaredcosCapV2,
                ..Default::default()
            }).unwrap();
            s.set_timesteps(k).unwrap();
            (s.timesteps().to_vec(), s.sigmas().unwrap().to_vec())
        } else {
            let mut s = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig {
                num_train_timesteps: n,
                beta_schedule: schedule,
                timestep_spacing: spacing,
                use_karras_sigmas: Some(karras),
                ..Default::default()
            }).unwrap();
            s.set_timesteps(k).unwrap();
            (s.timesteps().to_vec(), s.sigmas().unwrap().to_vec())
        };
        prop_assert_eq!(timesteps.len(), k);
        prop_assert_eq!(sigmas.len(), k + 1);
        prop_assert!(timesteps.iter().all(|&t| (0.0..n as f64).contains(&t)), "{:?}", timesteps);
        // Karras timesteps are rounded (DPM) and may repeat at the low end of a short table.
        let strict = !(dpm && karras);
        prop_assert!(timesteps.windows(2).all(|w| w[0] > w[1] || (!strict && w[0] == w[1])), "{:?}", timesteps);
        prop_assert!(sigmas.windows(2).all(|w| w[0] > w[1]), "{:?}", sigmas);
        prop_assert_eq!(sigmas[k], 0.0);
    }

    /// DPM-Solver SDE interleaves each step's timestep with its midpoint's (`2k - 1`
    /// timesteps), over positive non-increasing sigmas ending at 0, whatever the sigma spacing
    /// (plain, Karras, exponential or beta).
    #[test]
    fn dpm_sde_schedules_interleave_and_decrease(
        k in 1usize..60,
        spacing in spacing(),
        sigma_kind in 0usize..4,
    ) {
        let mut s = DPMSolverSDEScheduler::new(DPMSolverSDESchedulerConfig {
            timestep_spacing: spacing,
            use_karras_sigmas: sigma_kind == 1,
            use_exponential_sigmas: sigma_kind == 2,
            use_beta_sigmas: sigma_kind == 3,
            ..Default::default()
        }).unwrap();
        s.set_timesteps(k).unwrap();
        let timesteps = s.timesteps().to_vec();
        let sigmas = s.sigmas().unwrap().to_vec();
        prop_assert_eq!(timesteps.len(), 2 * k - 1);
        prop_assert_eq!(sigmas.len(), 2 * k);
        prop_assert!(timesteps.iter().all(|t| t.is_finite() && (0.0..1000.0).contains(t)), "{:?}", timesteps);
        prop_assert_eq!(sigmas[2 * k - 1], 0.0);
        prop_assert!(sigmas[..2 * k - 1].iter().all(|&v| v > 0.0), "{:?}", sigmas);
        prop_assert!(sigmas.windows(2).all(|w| w[0] >= w[1]), "{:?}", sigmas);
    }
}
