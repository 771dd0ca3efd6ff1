//! cargo xtask: developer and CI commands for ambit.
fn main() {}
