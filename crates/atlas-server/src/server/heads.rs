//! Zero-shot heads as the API names them: class names plus prompt templates, identified by a
//! hash of their content (the same classes and templates always give the same id).

use super::api::{HeadView, Templates};
use super::error::{ApiError, ApiResult};
use super::AppState;
use atlas_clip::{templates, ClipError};
use sha2::{Digest, Sha256};

use templates::MAX_TEXT;

pub fn resolve_templates(t: &Templates) -> ApiResult<Vec<String>> {
    match t {
        Templates::Named(n) => templates::resolve(std::slice::from_ref(n)),
        Templates::List(l) => templates::check(l.clone()),
    }
    .map_err(ApiError::bad)
}

pub fn check_classes(classes: &[String], max: usize) -> ApiResult<()> {
    if classes.is_empty() || classes.len() > max {
        return Err(ApiError::bad(format!(
            "give between 1 and {max} class names, got {}",
            classes.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for c in classes {
        if c.trim().is_empty() {
            return Err(ApiError::bad("class names must not be empty"));
        }
        if c.len() > MAX_TEXT || c.contains('\0') {
            return Err(ApiError::bad(format!(
                "class name {:?} is longer than {MAX_TEXT} bytes or contains NUL",
                truncate(c)
            )));
        }
        if !seen.insert(c.as_str()) {
            return Err(ApiError::bad(format!("class name {c:?} appears twice")));
        }
    }
    Ok(())
}

/// The head of these classes and templates, validated, with its content id.
pub fn head(
    classes: Vec<String>,
    templates: &Templates,
    max_classes: usize,
) -> ApiResult<HeadView> {
    check_classes(&classes, max_classes)?;
    let templates = resolve_templates(templates)?;
    let mut h = Sha256::new();
    for part in classes
        .iter()
        .chain([&String::new()])
        .chain(templates.iter())
    {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let id = format!("h{}", &hex::encode(h.finalize())[..16]);
    Ok(HeadView {
        id,
        classes,
        templates,
    })
}

/// [`head`] with the server's class limit, refused (400, naming the classes) once the model is
/// loaded if its tokenizer cannot tell the classes apart: for heads stored (POST /heads) or
/// learned with (POST /compositions) before they are built. Before the model is loaded, and
/// for class names sent to /classify, the check runs where the head is built (off the async
/// threads, once per head).
pub fn head_for(s: &AppState, classes: Vec<String>, templates: &Templates) -> ApiResult<HeadView> {
    let view = head(classes, templates, s.config.max_classes)?;
    let Some(tokenizer) = s.model.get().and_then(|m| m.backbone.tokenizer()) else {
        return Ok(view);
    };
    // Up to max_classes names of up to 1,000 bytes each: about half a second of tokenizing
    // at worst, which must not hold an async worker thread.
    let check = || atlas_clip::heads::check_distinct(tokenizer, &view.classes);
    let checked = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(check),
        _ => check(),
    };
    checked.map_err(|e| {
        ApiError::bad(match e {
            ClipError::Config(m) | ClipError::Tokenizer(m) => m,
            e => e.to_string(),
        })
    })?;
    Ok(view)
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_content_only() {
        let a = head(vec!["cat".into(), "dog".into()], &Templates::default(), 10).unwrap();
        let b = head(vec!["cat".into(), "dog".into()], &Templates::default(), 10).unwrap();
        let c = head(vec!["dog".into(), "cat".into()], &Templates::default(), 10).unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        // Boundaries are part of the hash: ["ab", "c"] is not ["a", "bc"].
        let d = head(vec!["ab".into(), "c".into()], &Templates::default(), 10).unwrap();
        let e = head(vec!["a".into(), "bc".into()], &Templates::default(), 10).unwrap();
        assert_ne!(d.id, e.id);
    }

    #[test]
    fn bad_classes_and_templates_say_why() {
        let err = |r: ApiResult<HeadView>| r.unwrap_err().detail;
        let t = Templates::default();
        assert!(err(head(vec![], &t, 10)).contains("between 1 and 10"));
        assert!(err(head(vec!["a".into(), "a".into()], &t, 10)).contains("twice"));
        assert!(err(head(vec![" ".into()], &t, 10)).contains("empty"));
        let nul = Templates::List(vec!["a {} \0".into()]);
        assert!(err(head(vec!["a".into()], &nul, 10)).contains("NUL"));
        let none = Templates::List(vec!["no slot".into()]);
        assert!(err(head(vec!["a".into()], &none, 10)).contains("exactly one {}"));
        let unknown = Templates::Named("NoSuchSet".into());
        assert!(err(head(vec!["a".into()], &unknown, 10)).contains("no templates"));
    }
}
