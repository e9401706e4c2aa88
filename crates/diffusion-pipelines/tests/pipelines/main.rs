//! Pipeline parity with diffusers on tiny random components (one test binary).

mod common;
mod stable_diffusion;
mod unconditional;
