//! `make-length-profile`: writes the ShareGPT-like length profile
//! ([`pagoda_benches::lengths::SHAREGPT_LIKE`]) as CSV, by default to the committed
//! `benches/profiles/sharegpt-like.csv`. Deterministic: rerunning it changes nothing unless the
//! parameters in `benches/src/lengths.rs` changed.
//!
//!   cargo run -p pagoda-benches --bin make-length-profile [-- PATH]
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("profiles/sharegpt-like.csv")
        });
    let profile = pagoda_benches::lengths::SHAREGPT_LIKE;
    std::fs::write(&path, profile.to_csv())?;
    println!("{} pairs -> {}", profile.num_pairs, path.display());
    Ok(())
}
