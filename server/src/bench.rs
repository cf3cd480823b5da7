//! Placeholder replaced below.
use anyhow::Result;
pub fn run(_args: &mut super::Args) -> Result<()> {
    anyhow::bail!("bench: not built yet")
}
