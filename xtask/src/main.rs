//! Project automation: `cargo xtask <check|test|test-kernels|fixtures|bench|setup-llvm>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

const USAGE: &str = "\
cargo xtask <command>

  check [--backends]   fmt, clippy -D warnings, crate dependency direction;
                       --backends also runs `cargo check` with each backend feature
  test                 fixture hashes, then `cargo test --workspace` (what CI runs)
  test-kernels [BACKEND..]
                       the fused GroupNorm/attention kernels against their references, and
                       fixture models against diffusers, on CubeCL devices without a GPU:
                       `cpu` (CubeCL on LLVM, the default) and/or
                       `wgpu` (lavapipe), or `cuda`; builds in target/kernels-BACKEND (or
                       $CARGO_TARGET_DIR) so the default build is left alone
  fixtures [SCRIPT..]  regenerate fixtures with the Python oracle (creates the venv);
                       all gen_*.py scripts, or the ones named (e.g. gen_unet2d)
  fixtures --check     verify committed fixtures against fixtures/MANIFEST.sha256
  fixtures --manifest  rewrite the manifest after running a gen_*.py script by hand
  bench [ARGS]         criterion benchmarks (`cargo bench -p diffusion-benches -- ARGS`)
  setup-llvm           point cubecl-llvm at Debian's LLVM 22 (needed by `cpu`/`cuda` builds)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("check") => check(args.iter().any(|a| a == "--backends")),
        Some("test") => {
            verify_manifest(&root)?;
            run(Command::new("cargo").args(["test", "--workspace"]))
        }
        Some("fixtures") if args.iter().any(|a| a == "--check") => verify_manifest(&root),
        Some("fixtures") if args.iter().any(|a| a == "--manifest") => write_manifest(&root),
        Some("fixtures") => regenerate_fixtures(&root, &args[1..]),
        Some("bench") => run(Command::new("cargo")
            .args(["bench", "-p", "diffusion-benches", "--"])
            .args(&args[1..])),
        Some("setup-llvm") => run(Command::new("bash").arg("scripts/setup-llvm.sh")),
        Some("test-kernels") => test_kernels(&root, &args[1..]),
        _ => {
            eprint!("{USAGE}");
            bail!("unknown or missing command")
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Allowed dependency direction between the workspace's library crates (shared/STYLE.md).
fn allowed_deps() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let mut m = BTreeMap::new();
    m.insert("diffusion-core", BTreeSet::new());
    m.insert("diffusion-schedulers", BTreeSet::from(["diffusion-core"]));
    m.insert("diffusion-models", BTreeSet::from(["diffusion-core"]));
    m.insert(
        "diffusion-loaders",
        BTreeSet::from(["diffusion-core", "diffusion-models"]),
    );
    let lower = [
        "diffusion-core",
        "diffusion-schedulers",
        "diffusion-models",
        "diffusion-loaders",
    ];
    m.insert("diffusion-pipelines", BTreeSet::from(lower));
    m.insert(
        "diffusion-train",
        BTreeSet::from([
            "diffusion-core",
            "diffusion-schedulers",
            "diffusion-models",
            "diffusion-loaders",
            "diffusion-pipelines",
        ]),
    );
    m
}

fn check_dependency_direction() -> Result<()> {
    let out = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let allowed = allowed_deps();
    let mut problems = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        let name = pkg["name"].as_str().unwrap_or_default();
        let internal: Vec<&str> = pkg["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["path"].is_string() && d["kind"].is_null())
            .filter_map(|d| d["name"].as_str())
            .collect();
        for dep in internal {
            if dep == "xtask" || dep == "diffusion-benches" || dep == "diffusion-cli" {
                problems.push(format!("{name} depends on {dep}: nothing may depend on it"));
            } else if let Some(ok) = allowed.get(name)
                && !ok.contains(dep)
            {
                problems.push(format!("{name} must not depend on {dep}"));
            }
        }
    }
    if !problems.is_empty() {
        bail!("dependency direction:\n  {}", problems.join("\n  "));
    }
    eprintln!("dependency direction: ok");
    Ok(())
}

fn check(backends: bool) -> Result<()> {
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    check_dependency_direction()?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    if backends {
        for feature in ["ndarray", "wgpu", "cuda", "tch"] {
            if feature == "cuda" {
                // cubecl-llvm would download LLVM; point it at Debian's first.
                run(Command::new("bash").arg("scripts/setup-llvm.sh"))?;
            }
            if feature == "tch"
                && std::env::var_os("LIBTORCH").is_none()
                && std::env::var_os("LIBTORCH_USE_PYTORCH").is_none()
            {
                eprintln!(
                    "skipping `tch`: it needs libtorch 2.9.0. Install it with \
                     `pip install torch==2.9.0` and set LIBTORCH_USE_PYTORCH=1 (with that python \
                     first on PATH), or set LIBTORCH=<dir>; see README.md"
                );
                continue;
            }
            run(Command::new("cargo").args([
                "check",
                "-p",
                "diffusion-cli",
                "--no-default-features",
                "--features",
                feature,
            ]))?;
        }
    }
    Ok(())
}

/// `cargo xtask test-kernels [cpu] [wgpu] [cuda]`: prepare what each backend needs, then run
/// `crates/diffusion-core/tests/kernels.rs` and `crates/diffusion-models/tests/kernel_device.rs`
/// on it, each backend in its own target folder.
fn test_kernels(root: &Path, backends: &[String]) -> Result<()> {
    let backends: Vec<&str> = if backends.is_empty() {
        vec!["cpu"]
    } else {
        backends.iter().map(String::as_str).collect()
    };
    // One folder per backend feature set, so switching backends rebuilds nothing; a
    // CARGO_TARGET_DIR given by the caller is used as it is.
    let given = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
    for backend in backends {
        match backend {
            // cubecl-llvm would download LLVM; point it at Debian's first.
            "cpu" | "cuda" => run(Command::new("bash").arg("scripts/setup-llvm.sh"))?,
            "wgpu" => ensure_lavapipe()?,
            other => bail!("test-kernels: unknown backend `{other}` (cpu, wgpu, cuda)"),
        }
        // The kernels against their references, then fixture models against diffusers with
        // the layouts a kernel device uses: one cargo invocation, so that both tests resolve
        // one feature set and share one build of burn (two invocations resolved different
        // features for burn's dependencies and built it twice).
        run(Command::new("cargo")
            .env(
                "CARGO_TARGET_DIR",
                given
                    .clone()
                    .unwrap_or_else(|| root.join(format!("target/kernels-{backend}"))),
            )
            .env("KERNEL_TEST_DEVICE", backend)
            .args([
                "test",
                "-p",
                "diffusion-core",
                "-p",
                "diffusion-models",
                "--features",
            ])
            .arg(format!(
                "diffusion-core/{backend},diffusion-models/{backend}"
            ))
            .args(["--test", "kernels", "--test", "kernel_device"])
            .args(["--", "--nocapture", "--test-threads", "1"]))?;
    }
    Ok(())
}

/// wgpu needs a Vulkan driver; lavapipe (Mesa's CPU Vulkan) is enough for kernel tests.
fn ensure_lavapipe() -> Result<()> {
    let icd = Path::new("/usr/share/vulkan/icd.d");
    let has_lavapipe = std::fs::read_dir(icd).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("lvp_icd"))
    });
    if !has_lavapipe {
        eprintln!("installing lavapipe (mesa-vulkan-drivers) for wgpu without a GPU");
        run(Command::new("apt-get").args([
            "install",
            "-y",
            "-qq",
            "mesa-vulkan-drivers",
            "libvulkan1",
        ]))?;
    }
    Ok(())
}

fn oracle_python(root: &Path) -> Result<PathBuf> {
    let venv = root.join("fixtures/oracle/.venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        eprintln!(
            "creating the oracle venv in {} (about 3 GB, several minutes)",
            venv.display()
        );
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "-r"])
            .arg(root.join("fixtures/oracle/requirements.txt")))?;
        // triton is GPU-only and 1 GB; nothing on CPU uses it.
        let _ = Command::new(&python)
            .args(["-m", "pip", "uninstall", "-y", "-q", "triton"])
            .status();
    }
    Ok(python)
}

/// Run every `fixtures/oracle/gen_*.py` (or the ones named), then rewrite the manifest.
fn regenerate_fixtures(root: &Path, only: &[String]) -> Result<()> {
    let python = oracle_python(root)?;
    let oracle = root.join("fixtures/oracle");
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&oracle)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("gen_") && name.ends_with(".py")
        })
        .filter(|p| {
            only.is_empty()
                || only
                    .iter()
                    .any(|o| p.file_stem().and_then(|s| s.to_str()) == Some(o.as_str()))
        })
        .collect();
    scripts.sort();
    for script in scripts {
        run(Command::new(&python)
            .arg(&script)
            .current_dir(&oracle)
            .env("HF_HUB_OFFLINE", "1")
            .env("OMP_NUM_THREADS", "1"))?;
    }
    write_manifest(root)
}

fn fixture_files(root: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with('.') || name == "__pycache__" {
                continue;
            }
            if path.is_dir() {
                walk(&path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(&root.join("fixtures"), &mut files)?;
    files.retain(|p| {
        !p.ends_with("MANIFEST.sha256") && !p.starts_with(root.join("fixtures/oracle"))
    });
    files.sort();
    Ok(files)
}

fn manifest(root: &Path) -> Result<String> {
    let mut text = String::new();
    for file in fixture_files(root)? {
        let bytes = std::fs::read(&file)?;
        let digest = Sha256::digest(&bytes);
        let rel = file.strip_prefix(root.join("fixtures"))?;
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("{hex}  {}\n", rel.display()));
    }
    Ok(text)
}

fn write_manifest(root: &Path) -> Result<()> {
    std::fs::write(root.join("fixtures/MANIFEST.sha256"), manifest(root)?)?;
    eprintln!("fixtures/MANIFEST.sha256 written");
    Ok(())
}

fn verify_manifest(root: &Path) -> Result<()> {
    let path = root.join("fixtures/MANIFEST.sha256");
    let committed = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let actual = manifest(root)?;
    if committed != actual {
        let a: BTreeSet<&str> = committed.lines().collect();
        let b: BTreeSet<&str> = actual.lines().collect();
        let mut diff = String::new();
        for l in a.difference(&b) {
            diff.push_str(&format!("  manifest only: {l}\n"));
        }
        for l in b.difference(&a) {
            diff.push_str(&format!("  on disk only:  {l}\n"));
        }
        bail!("fixtures differ from fixtures/MANIFEST.sha256:\n{diff}");
    }
    eprintln!(
        "fixtures match the manifest ({} files)",
        actual.lines().count()
    );
    Ok(())
}
