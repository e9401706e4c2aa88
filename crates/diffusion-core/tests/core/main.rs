//! Integration tests of diffusion-core against the oracle fixtures (one binary: linking is slow).

mod common;
mod config;
mod generator;
mod image_io;
