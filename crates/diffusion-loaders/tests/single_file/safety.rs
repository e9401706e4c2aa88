//! Malicious `.ckpt` files are refused while parsing and run nothing.

use std::path::Path;

use diffusion_core::Error;
use diffusion_loaders::SingleFileCheckpoint;
use diffusion_loaders::single_file::torch_zip::TorchCheckpoint;

use crate::fixture;

/// What the payloads of `fixtures/loaders/malicious/*.ckpt` would create if executed.
const MARKER: &str = "/tmp/diffusers-rs-malicious-ckpt-marker";

fn assert_refused(file: &str, global: &str) {
    let path = fixture("malicious").join(file);
    let _ = std::fs::remove_file(MARKER);
    for result in [
        SingleFileCheckpoint::open(&path).map(|_| ()),
        TorchCheckpoint::open(&path).map(|_| ()),
    ] {
        match result {
            Err(Error::UnsafePickle { path: p, global: g }) => {
                assert_eq!(p, path);
                assert_eq!(g, global);
            }
            other => panic!("{file}: expected UnsafePickle, got {other:?}"),
        }
    }
    assert!(!Path::new(MARKER).exists(), "{file}: the payload ran");
}

#[test]
fn a_ckpt_calling_os_system_is_refused_and_nothing_runs() {
    // Python pickles `os.system` under its defining module, `posix`.
    assert_refused("system.ckpt", "posix.system");
    let message = SingleFileCheckpoint::open(fixture("malicious").join("system.ckpt"))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("posix.system") && message.contains("nothing was executed"),
        "{message}"
    );
}

#[test]
fn a_ckpt_calling_eval_is_refused_and_nothing_runs() {
    assert_refused("eval.ckpt", "builtins.eval");
}

#[test]
fn a_protocol_4_ckpt_calling_subprocess_is_refused_and_nothing_runs() {
    assert_refused("subprocess.ckpt", "subprocess.call");
}
