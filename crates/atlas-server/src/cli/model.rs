//! The backbone a subcommand names (`serve --model`, `learn --model`, `finetune --base`): a
//! CLIP checkpoint (a directory or a hub id), or `demo` / `demo:<preset>`, the offline demo
//! world, built into the cache on first use (the log says whether it is cached or being
//! built, and where it lives).

use anyhow::Context;
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::TaskVector;
use atlas_demo::{Preset, World, WorldParams};
use std::sync::Arc;

/// What `demo` alone means: the world `serve` builds when no model is given.
pub const DEFAULT_DEMO: Preset = Preset::Full;

/// The demo preset `model` names (`demo`, `demo:full`, `demo:ci`), or None for a checkpoint.
/// A directory called `demo` is still reachable as `./demo`.
pub fn demo_preset(model: &str) -> anyhow::Result<Option<Preset>> {
    let Some(rest) = model.strip_prefix("demo") else {
        return Ok(None);
    };
    match rest.strip_prefix(':') {
        None if rest.is_empty() => Ok(Some(DEFAULT_DEMO)),
        None => Ok(None),
        Some(p) => Preset::parse(p)
            .map(Some)
            .with_context(|| format!("unknown demo world {model:?}: demo, demo:full or demo:ci")),
    }
}

/// The demo world of `preset`: loaded from the cache, or built there first; its backbone on
/// `opts`' device and compute dtype.
pub fn demo_world(preset: Preset, opts: LoadOptions) -> anyhow::Result<World> {
    let params = WorldParams::preset(preset);
    let root = atlas_demo::world::default_cache_root()?;
    let dir = atlas_demo::world::world_dir(&root, &params);
    let when = if dir.join("world.json").is_file() {
        "cached"
    } else {
        "not built yet: building it now takes minutes"
    };
    eprintln!(
        "atlas-serve: demo world 'demo:{}' in {} ({when})",
        preset.name(),
        dir.display()
    );
    let (world, built) = World::open_with(
        &params,
        &root,
        &mut super::progress::Progress::new("atlas-serve: demo world"),
        &std::sync::atomic::AtomicBool::new(false),
        opts,
    )?;
    if built {
        eprintln!("atlas-serve: demo world built");
    }
    Ok(world)
}

/// A checkpoint's backbone; or the demo world's, with its task vectors (one per task).
pub fn load(
    model: &str,
    options: LoadOptions,
) -> anyhow::Result<(Backbone, Option<Vec<Arc<TaskVector>>>)> {
    match demo_preset(model)? {
        Some(preset) => {
            let World {
                backbone,
                task_vectors,
                ..
            } = demo_world(preset, options)?;
            Ok((backbone, Some(task_vectors)))
        }
        None => {
            let backbone = Backbone::load(model, options)
                .with_context(|| format!("loading the backbone {model}"))?;
            Ok((backbone, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_names_parse() {
        assert_eq!(demo_preset("demo").unwrap(), Some(DEFAULT_DEMO));
        assert_eq!(demo_preset("demo:ci").unwrap(), Some(Preset::Ci));
        assert_eq!(demo_preset("demo:full").unwrap(), Some(Preset::Full));
        assert!(demo_preset("demo:tiny").is_err());
        for checkpoint in ["./demo", "demos", "openai/clip-vit-base-patch32", "demo/x"] {
            assert_eq!(demo_preset(checkpoint).unwrap(), None, "{checkpoint}");
        }
    }
}
