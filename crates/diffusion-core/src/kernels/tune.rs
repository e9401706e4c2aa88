//! Routes chosen by measurement ([`super::AttentionRoute::Tune`], [`super::ConvRoute::Tune`]):
//! the first call with a new shape times every candidate route on the device and the fastest
//! serves that shape for the rest of the process, the way burn's autotune picks among its own
//! kernels. [`tuned_choices`] lists what was chosen.
//!
//! Tuning synchronises the device, so a shape must have run once before a CUDA graph captures
//! it (burn's `capture` warms its closure up three times first, which does it).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use burn::tensor::Device;

/// Timed runs of each candidate, after one untimed run that compiles and autotunes what the
/// candidate launches.
const TIMED_RUNS: usize = 3;

/// The route kept for each key of one operation (a `static` behind a
/// [`std::sync::LazyLock`]).
pub(crate) struct Choices<K> {
    /// What the choices are for, in [`tuned_choices`] ("attention", "conv2d").
    op: &'static str,
    map: Mutex<HashMap<K, Choice>>,
}

#[derive(Clone, Debug)]
struct Choice {
    index: usize,
    /// The key and every candidate's time, for [`tuned_choices`].
    report: TunedChoice,
}

/// One shape's measurement: which candidate won and what each took.
#[derive(Clone, Debug, PartialEq)]
pub struct TunedChoice {
    /// The operation ("attention", "conv2d").
    pub op: &'static str,
    /// The shape, as the operation describes it (dims, dtype, options).
    pub shape: String,
    /// Every candidate's name and milliseconds per run, in the order they were timed.
    pub times_ms: Vec<(String, f64)>,
    /// The name of the fastest candidate, which serves this shape from now on.
    pub chosen: String,
}

/// Every shape tuned so far in this process, attention first, each operation's in no
/// particular order.
pub fn tuned_choices() -> Vec<TunedChoice> {
    let mut all = super::attention::tuned_choices();
    all.extend(super::conv::tuned_choices());
    all
}

impl<K: Eq + Hash + Clone> Choices<K> {
    /// Nothing chosen yet (for a `static` behind a [`std::sync::LazyLock`]).
    pub(crate) fn new(op: &'static str) -> Self {
        Self {
            op,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Choice>> {
        // A panic elsewhere while the map was held leaves it consistent (inserts are whole).
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index of the candidate kept for `key`, if it was tuned: what a caller checks before
    /// it builds its list of candidates, so that tuned shapes cost one lookup.
    pub(crate) fn get(&self, key: &K) -> Option<usize> {
        self.lock().get(key).map(|choice| choice.index)
    }

    /// The index of the candidate kept for `key`; the first time, the fastest of `names` by
    /// `time(index)`, remembered (the first listed wins a tie). `shape` describes the key in
    /// [`tuned_choices`]. The map is not held while timing, so a candidate may itself tune.
    pub(crate) fn choose(
        &self,
        key: &K,
        shape: impl FnOnce() -> String,
        names: &[&str],
        mut time: impl FnMut(usize) -> Duration,
    ) -> usize {
        if let Some(index) = self.get(key) {
            return index;
        }
        if names.len() < 2 {
            return 0;
        }
        let times: Vec<Duration> = (0..names.len()).map(&mut time).collect();
        let index = (0..names.len())
            .min_by_key(|&i| times[i])
            .expect("two candidates or more");
        let report = TunedChoice {
            op: self.op,
            shape: shape(),
            times_ms: names
                .iter()
                .zip(&times)
                .map(|(name, t)| (name.to_string(), t.as_secs_f64() * 1e3))
                .collect(),
            chosen: names[index].to_string(),
        };
        // Another thread may have tuned the same key meanwhile: the first answer stays.
        self.lock()
            .entry(key.clone())
            .or_insert(Choice { index, report })
            .index
    }

    pub(crate) fn reports(&self) -> Vec<TunedChoice> {
        self.lock().values().map(|c| c.report.clone()).collect()
    }
}

/// Wall time per run of `run` on `device`: one untimed run, then [`TIMED_RUNS`] between
/// synchronisations. The outputs are held until the device has finished with them: a lazy
/// backend (burn's fusion) may skip work whose result is dropped before it runs.
pub(crate) fn time_on<T>(device: &Device, mut run: impl FnMut() -> T) -> Duration {
    let warm = run();
    // A failed synchronisation shows up again in the caller's own work; timing goes on.
    let _ = device.sync();
    drop(warm);
    let start = Instant::now();
    let outputs: Vec<T> = (0..TIMED_RUNS).map(|_| run()).collect();
    let _ = device.sync();
    let elapsed = start.elapsed();
    drop(outputs);
    elapsed / TIMED_RUNS as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_candidate_is_kept_and_timed_once_per_key() {
        let choices = Choices::<(usize, usize)>::new("test op");
        let mut timed = Vec::new();
        let ms = [5u64, 2, 9];
        let mut pick = |key: (usize, usize)| {
            choices.choose(
                &key,
                || format!("{key:?}"),
                &["a", "b", "c"],
                |i| {
                    timed.push((key, i));
                    Duration::from_millis(ms[i] + key.0 as u64 * (i == 1) as u64 * 10)
                },
            )
        };
        assert_eq!(pick((0, 1)), 1);
        assert_eq!(pick((0, 1)), 1);
        assert_eq!(choices.get(&(0, 1)), Some(1));
        assert_eq!(choices.get(&(1, 1)), None);
        // Another key is timed again: here "b" is slow.
        assert_eq!(pick((1, 1)), 0);
        assert_eq!(pick((1, 1)), 0);
        assert_eq!(
            timed,
            [
                ((0, 1), 0),
                ((0, 1), 1),
                ((0, 1), 2),
                ((1, 1), 0),
                ((1, 1), 1),
                ((1, 1), 2)
            ]
        );
        let mut reports = choices.reports();
        reports.sort_by(|a, b| a.shape.cmp(&b.shape));
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].op, "test op");
        assert_eq!(reports[0].shape, "(0, 1)");
        assert_eq!(reports[0].chosen, "b");
        assert_eq!(
            reports[0].times_ms,
            [("a".into(), 5.0), ("b".into(), 2.0), ("c".into(), 9.0)]
        );
        assert_eq!(reports[1].chosen, "a");
    }

    #[test]
    fn a_single_candidate_is_not_timed_and_ties_go_to_the_first() {
        let choices = Choices::<u8>::new("test op");
        let index = choices.choose(&0, String::new, &["only"], |_| panic!("nothing to compare"));
        assert_eq!(index, 0);
        assert!(choices.reports().is_empty());
        let index = choices.choose(&1, String::new, &["x", "y"], |_| Duration::from_millis(3));
        assert_eq!(index, 0);
    }

    #[cfg(feature = "flex")]
    #[test]
    fn timing_runs_the_work_and_measures_it() {
        let device = Device::flex();
        let mut runs = 0;
        let t = time_on(&device, || {
            runs += 1;
            std::thread::sleep(Duration::from_millis(4));
            burn::tensor::Tensor::<1>::ones([8], &device)
        });
        assert_eq!(runs, 1 + TIMED_RUNS);
        assert!(t >= Duration::from_millis(4), "{t:?}");
    }
}
